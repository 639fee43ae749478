//! Threads that each consume one partition (materializers, history sinks), each with its own
//! stop flag: a cluster node starts and stops them one partition at a time as ownership
//! moves, and stops them all at shutdown.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use parking_lot::Mutex;

type Running = (Arc<AtomicBool>, JoinHandle<()>);

#[derive(Default)]
pub struct PartitionThreads {
    running: Mutex<BTreeMap<u32, Running>>,
}

impl PartitionThreads {
    pub fn contains(&self, partition: u32) -> bool {
        self.running.lock().contains_key(&partition)
    }

    /// Records `partition`'s thread, which stops once `stop` is set.
    pub fn insert(&self, partition: u32, stop: Arc<AtomicBool>, handle: JoinHandle<()>) {
        let previous = self.running.lock().insert(partition, (stop, handle));
        assert!(previous.is_none(), "one thread per partition");
    }

    /// Stops `partition`'s thread and waits for it; false if none ran.
    pub fn stop(&self, partition: u32) -> bool {
        let Some((stop, handle)) = self.running.lock().remove(&partition) else {
            return false;
        };
        stop.store(true, Ordering::Release);
        let _ = handle.join();
        true
    }

    /// Stops every thread: all flags first, so they wind down together, then waits.
    pub fn stop_all(&self) {
        let running = std::mem::take(&mut *self.running.lock());
        for (stop, _) in running.values() {
            stop.store(true, Ordering::Release);
        }
        for (_, (_, handle)) in running {
            let _ = handle.join();
        }
    }

    /// The partitions with a thread, ascending.
    pub fn partitions(&self) -> Vec<u32> {
        self.running.lock().keys().copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_thread_stops_on_its_own_flag() {
        let threads = PartitionThreads::default();
        for p in [3, 1] {
            let stop = Arc::new(AtomicBool::new(false));
            let flag = stop.clone();
            let h = std::thread::spawn(move || {
                while !flag.load(Ordering::Acquire) {
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
            });
            threads.insert(p, stop, h);
        }
        assert_eq!(threads.partitions(), vec![1, 3]);
        assert!(threads.stop(3));
        assert!(!threads.stop(3), "already stopped");
        assert!(threads.contains(1) && !threads.contains(3));
        threads.stop_all();
        assert!(threads.partitions().is_empty());
    }
}
