//! A cap on the connections a local server holds open. Any local user can
//! connect to the status port, so idle connections must not use up the
//! agent's file descriptors (and with them its ability to save state).
//! At the cap, a new connection pushes out the oldest idle one; when none
//! is idle (all are being answered), the new one is turned away.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;
use tokio::task::AbortHandle;

/// The connections of one server, on the agent's single-threaded runtime.
#[derive(Clone)]
pub struct ConnectionLimit {
    slots: Rc<RefCell<Slots>>,
}

struct Slots {
    cap: usize,
    next_id: u64,
    /// Oldest first.
    live: VecDeque<Slot>,
}

struct Slot {
    id: u64,
    idle: bool,
    task: Option<AbortHandle>,
}

/// One admitted connection; frees its slot when dropped.
pub struct Admitted {
    id: u64,
    slots: Rc<RefCell<Slots>>,
}

impl ConnectionLimit {
    pub fn new(cap: usize) -> ConnectionLimit {
        ConnectionLimit {
            slots: Rc::new(RefCell::new(Slots {
                cap,
                next_id: 0,
                live: VecDeque::new(),
            })),
        }
    }

    /// A slot for a new (idle) connection, ending the oldest idle one if
    /// the cap is reached; `None` when every slot is busy.
    fn admit(&self) -> Option<Admitted> {
        let mut slots = self.slots.borrow_mut();
        if slots.live.len() >= slots.cap {
            let oldest_idle = slots.live.iter().position(|s| s.idle)?;
            if let Some(task) = slots.live.remove(oldest_idle).and_then(|s| s.task) {
                task.abort();
            }
        }
        let id = slots.next_id;
        slots.next_id += 1;
        slots.live.push_back(Slot {
            id,
            idle: true,
            task: None,
        });
        Some(Admitted {
            id,
            slots: self.slots.clone(),
        })
    }

    /// Admits a connection and spawns its task on the local set, where it
    /// can be ended to make room; false when it was turned away.
    pub fn spawn<F>(&self, connection: impl FnOnce(Admitted) -> F) -> bool
    where
        F: std::future::Future<Output = ()> + 'static,
    {
        let Some(admitted) = self.admit() else {
            return false;
        };
        let id = admitted.id;
        let task = tokio::task::spawn_local(connection(admitted)).abort_handle();
        let mut slots = self.slots.borrow_mut();
        if let Some(slot) = slots.live.iter_mut().find(|s| s.id == id) {
            slot.task = Some(task);
        }
        true
    }

    /// Connections held open.
    #[cfg(test)]
    fn live(&self) -> usize {
        self.slots.borrow().live.len()
    }
}

impl Admitted {
    /// Waiting for the client: may be ended to make room.
    pub fn idle(&self) {
        self.with_slot(|slot| slot.idle = true);
    }

    /// Being answered: kept.
    pub fn busy(&self) {
        self.with_slot(|slot| slot.idle = false);
    }

    fn with_slot(&self, f: impl FnOnce(&mut Slot)) {
        let mut slots = self.slots.borrow_mut();
        if let Some(slot) = slots.live.iter_mut().find(|s| s.id == self.id) {
            f(slot);
        }
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut slots = self.slots.borrow_mut();
        slots.live.retain(|s| s.id != self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oldest_idle_connection_makes_room_and_busy_ones_are_kept() {
        let limit = ConnectionLimit::new(3);
        let first = limit.admit().unwrap();
        let second = limit.admit().unwrap();
        let third = limit.admit().unwrap();
        first.busy();
        // Full: the oldest idle one (the second) goes.
        let fourth = limit.admit().unwrap();
        assert_eq!(limit.live(), 3);
        second.busy(); // ended already: no effect on the others
        third.busy();
        fourth.busy();
        assert!(limit.admit().is_none(), "every slot is busy");
        fourth.idle();
        let _fifth = limit.admit().expect("the fourth makes room");
        drop(first);
        // The third and the fifth.
        assert_eq!(limit.live(), 2);
    }

    #[test]
    fn an_ended_connection_task_is_aborted() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        tokio::task::LocalSet::new().block_on(&rt, async {
            let limit = ConnectionLimit::new(1);
            let (tx, rx) = tokio::sync::oneshot::channel::<()>();
            assert!(limit.spawn(|old| async move {
                let _old = old;
                let _tx = tx;
                std::future::pending::<()>().await
            }));
            tokio::task::yield_now().await;
            let _new = limit.admit().unwrap();
            // The aborted task drops its sender.
            assert!(rx.await.is_err());
            assert_eq!(limit.live(), 1);
        });
    }
}
