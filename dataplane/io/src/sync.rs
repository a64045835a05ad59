//! The fallback engine: a small pool of threads doing `pread`/`pwrite`/`fdatasync`,
//! for kernels or seccomp profiles without io_uring. Same contract as the ring:
//! operations own their buffers until their completion is reaped.

use std::collections::VecDeque;
use std::io;
use std::os::fd::RawFd;
use std::sync::Arc;
use std::thread::JoinHandle;

use parking_lot::{Condvar, Mutex};

use crate::engine::{IoCompletion, IoEngine, IoOp, OpKind, Wake, Waker};

#[derive(Default)]
struct State {
    queue: VecDeque<IoOp>,
    done: Vec<IoCompletion>,
    woken: bool,
    closing: bool,
}

struct Shared {
    files: Vec<RawFd>,
    state: Mutex<State>,
    work: Condvar,
    reaper: Condvar,
}

impl Wake for Shared {
    fn wake(&self) {
        self.state.lock().woken = true;
        self.reaper.notify_one();
    }
}

pub struct SyncEngine {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    pending: Vec<IoOp>,
    in_flight: usize,
}

impl std::fmt::Debug for SyncEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyncEngine")
            .field("in_flight", &self.in_flight)
            .finish()
    }
}

impl SyncEngine {
    pub fn new(files: &[RawFd], depth: u32) -> io::Result<Self> {
        let shared = Arc::new(Shared {
            files: files.to_vec(),
            state: Mutex::new(State::default()),
            work: Condvar::new(),
            reaper: Condvar::new(),
        });
        let threads = depth.clamp(1, 8);
        let workers = (0..threads)
            .map(|i| {
                let shared = shared.clone();
                std::thread::Builder::new()
                    .name(format!("berth-pio-{i}"))
                    .spawn(move || {
                        let _guard = crate::AbortOnPanic("berth-pio");
                        worker(&shared)
                    })
            })
            .collect::<io::Result<_>>()?;
        Ok(SyncEngine {
            shared,
            workers,
            pending: Vec::new(),
            in_flight: 0,
        })
    }
}

fn run(files: &[RawFd], op: &mut IoOp) -> io::Result<usize> {
    let fd = *files
        .get(op.file as usize)
        .ok_or_else(|| io::Error::from_raw_os_error(libc::EBADF))?;
    let off = op.offset as libc::off_t;
    let n = match (op.kind, op.buf.as_mut()) {
        // SAFETY: fdatasync on a descriptor the engine's owner keeps open.
        (OpKind::DataSync, _) => (unsafe { libc::fdatasync(fd) }) as isize,
        // SAFETY: the buffer is owned by the op for the duration of the call.
        (OpKind::Read, Some(b)) => unsafe { libc::pread(fd, b.as_mut_ptr().cast(), b.len(), off) },
        // SAFETY: as above.
        (OpKind::Write, Some(b)) => unsafe { libc::pwrite(fd, b.as_ptr().cast(), b.len(), off) },
        (_, None) => return Err(io::Error::from_raw_os_error(libc::EINVAL)),
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

fn worker(shared: &Shared) {
    loop {
        let mut op = {
            let mut st = shared.state.lock();
            loop {
                if let Some(op) = st.queue.pop_front() {
                    break op;
                }
                if st.closing {
                    return;
                }
                shared.work.wait(&mut st);
            }
        };
        let result = run(&shared.files, &mut op);
        shared.state.lock().done.push(IoCompletion {
            user_data: op.user_data,
            result,
            buf: op.buf,
        });
        shared.reaper.notify_one();
    }
}

impl IoEngine for SyncEngine {
    fn push(&mut self, op: IoOp) {
        self.in_flight += 1;
        self.pending.push(op);
    }

    fn submit_and_wait(
        &mut self,
        wait: bool,
        max: usize,
        out: &mut Vec<IoCompletion>,
    ) -> io::Result<()> {
        let mut st = self.shared.state.lock();
        let n = self.pending.len();
        st.queue.extend(self.pending.drain(..));
        if n > 0 {
            self.shared.work.notify_all();
        }
        if wait {
            while st.done.is_empty() && !st.woken {
                self.shared.reaper.wait(&mut st);
            }
        }
        st.woken = false;
        let n = st.done.len().min(max);
        self.in_flight -= n;
        out.extend(st.done.drain(..n));
        Ok(())
    }

    fn in_flight(&self) -> usize {
        self.in_flight
    }

    fn has_completions(&mut self) -> bool {
        !self.shared.state.lock().done.is_empty()
    }

    fn waker(&self) -> Waker {
        self.shared.clone()
    }

    fn name(&self) -> &'static str {
        "sync"
    }
}

impl Drop for SyncEngine {
    fn drop(&mut self) {
        // Workers finish what is queued, so no buffer is freed under a syscall.
        self.shared.state.lock().closing = true;
        self.shared.work.notify_all();
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}
