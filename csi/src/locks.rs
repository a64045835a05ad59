//! Operations in flight, by object: a second call on a volume or snapshot that
//! is already being worked on gets ABORTED at once (the CSI spec's answer to
//! concurrent operations) instead of queueing behind the first.

use std::collections::HashSet;
use std::sync::Arc;

use parking_lot::Mutex;
use tonic::Status;

#[derive(Debug, Default, Clone)]
pub struct InFlight {
    busy: Arc<Mutex<HashSet<String>>>,
}

/// Held while the operation runs; frees its keys when dropped.
#[derive(Debug)]
pub struct Held {
    busy: Arc<Mutex<HashSet<String>>>,
    keys: Vec<String>,
}

impl Drop for Held {
    fn drop(&mut self) {
        let mut b = self.busy.lock();
        for k in &self.keys {
            b.remove(k);
        }
    }
}

impl InFlight {
    /// Takes every key or none: ABORTED naming the first that is busy.
    pub fn begin(&self, keys: &[String]) -> Result<Held, Status> {
        let mut b = self.busy.lock();
        if let Some(k) = keys.iter().find(|k| b.contains(*k)) {
            return Err(Status::aborted(format!(
                "an operation on {k} is already in progress; retry later"
            )));
        }
        for k in keys {
            b.insert(k.clone());
        }
        Ok(Held {
            busy: self.busy.clone(),
            keys: keys.to_vec(),
        })
    }

    pub fn volume(&self, id: &str) -> Result<Held, Status> {
        self.begin(&[format!("volume {id}")])
    }

    pub fn snapshot(&self, id: &str) -> Result<Held, Status> {
        self.begin(&[format!("snapshot {id}")])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_operation_on_a_key_is_aborted_until_the_first_ends() {
        let f = InFlight::default();
        let a = f.volume("v1").expect("free");
        let e = f.volume("v1").expect_err("busy");
        assert_eq!(e.code(), tonic::Code::Aborted);
        assert!(e.message().contains("volume v1"), "{}", e.message());
        // Other objects are independent; a snapshot of the same name too.
        let _b = f.volume("v2").expect("other volume");
        let _s = f.snapshot("v1").expect("a snapshot is another object");
        drop(a);
        let _again = f.volume("v1").expect("free again");
    }

    #[test]
    fn several_keys_are_taken_all_or_none() {
        let f = InFlight::default();
        let _v = f.volume("src").expect("free");
        let both = ["snapshot s1".to_string(), "volume src".to_string()];
        assert!(f.begin(&both).is_err());
        // The failed attempt did not keep the snapshot key.
        let _s = f
            .snapshot("s1")
            .expect("s1 was not taken by the failed call");
    }
}
