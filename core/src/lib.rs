//! weft-core: the control plane of one weft node as a plain value, with no
//! I/O inside.
//!
//! A [`Router`] is fed inputs and polled for outputs, in the style of
//! quinn-proto and str0m. It never reads a clock, an OS random source or a
//! socket: time arrives as a [`Time`] with every input, randomness comes
//! from the seeded ChaCha stream given to [`Router::new`], and every map
//! iterates in a fixed order. The same inputs therefore give the same
//! outputs, byte for byte, which is what lets the simulator replay a whole
//! cluster from one seed and the agent run the very same code for real.
//!
//! # The calling rule
//!
//! After **every** input, drain **all** outputs before the next input:
//!
//! ```text
//! loop {
//!     // one input:
//!     router.handle_datagram(now, from, &bytes);   // a datagram arrived, or
//!     router.handle_timeout(now);                  // the timer fired, or
//!     router.add_peer_address(now, addr);          // a local command
//!
//!     // then drain the outputs:
//!     while let Some(t) = router.poll_transmit() { send t.payload to t.destination }
//!     while let Some(e) = router.poll_event()    { apply e (dataplane, logs) }
//!     let wake_at = router.poll_timeout();          // sleep until then or the next datagram
//! }
//! ```
//!
//! Calling `handle_timeout` early or late is harmless (it runs what is due);
//! never calling it stops heartbeats and the node is declared dead.
//! Persist [`Router::state`] once after construction, before sending the
//! first datagram: it makes a restart the same peer.
//!
//! # Modules
//!
//! - [`peer`]: peer names and nicknames.
//! - [`connections`]: direct links confirmed by heartbeats both ways,
//!   address retries with backoff, the connection limit.
//! - [`topology`]: every peer's own entry, merged by version.
//! - [`routes`]: next hops and broadcast trees over confirmed links;
//!   [`unreachable`]: peers without a route, oldest first.
//! - [`wire`]: the datagram format; [`seal`]: encryption and replay refusal.
//! - [`router`]: the state machine tying them together, its timers in
//!   one table (`timer`); [`status`]: its serializable view.

pub mod config;
pub mod connections;
pub mod forward;
pub mod ipam;
mod name_map;
pub mod peer;
pub mod random;
pub mod router;
pub mod routes;
pub mod seal;
pub mod status;
pub mod time;
mod timer;
pub mod topology;
pub mod unreachable;
pub mod view;
pub mod wire;

/// A tiny in-memory network for tests and examples (feature `harness`).
#[cfg(any(test, feature = "harness"))]
pub mod harness;

pub use config::{Config, ConfigError};
pub use peer::PeerName;
pub use router::{Event, PersistedState, Router, Transmit};
pub use routes::Routes;
pub use status::{DropReason, Status};
pub use time::Time;
pub use topology::{PeerEntry, Topology};
pub use view::View;
