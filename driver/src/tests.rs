use super::*;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use weft_core::Config;
use weft_core::ipam::{IpamInit, IpamMode};

/// An in-memory network: every socket's inbox, by address.
#[derive(Clone, Default)]
struct Wires(Arc<Mutex<BTreeMap<SocketAddr, Inbox>>>);

type Inbox = mpsc::UnboundedSender<(Vec<u8>, SocketAddr)>;

struct Pipe {
    me: SocketAddr,
    wires: Wires,
    inbox: tokio::sync::Mutex<mpsc::UnboundedReceiver<(Vec<u8>, SocketAddr)>>,
}

impl Wires {
    fn socket(&self, me: SocketAddr) -> Pipe {
        let (tx, rx) = mpsc::unbounded_channel();
        self.0.lock().unwrap().insert(me, tx);
        Pipe {
            me,
            wires: self.clone(),
            inbox: tokio::sync::Mutex::new(rx),
        }
    }
}

impl Datagrams for Pipe {
    async fn send_to(&self, payload: &[u8], to: SocketAddr) -> io::Result<usize> {
        if let Some(tx) = self.wires.0.lock().unwrap().get(&to) {
            let _ = tx.send((payload.to_vec(), self.me));
        }
        Ok(payload.len())
    }
    async fn recv_from(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        let (bytes, from) = self.inbox.lock().await.recv().await.expect("wires live");
        buf[..bytes.len()].copy_from_slice(&bytes);
        Ok((bytes.len(), from))
    }
}

/// Records every saved state; fails once told to.
#[derive(Clone, Default)]
struct Disk {
    saved: Arc<Mutex<Vec<PersistedState>>>,
    broken: Arc<Mutex<bool>>,
}

impl Host for Disk {
    fn persist(&mut self, state: &PersistedState) -> io::Result<()> {
        if *self.broken.lock().unwrap() {
            return Err(io::Error::other("disk full"));
        }
        self.saved.lock().unwrap().push(state.clone());
        Ok(())
    }
}

fn address(i: u8) -> SocketAddr {
    SocketAddr::from(([192, 168, 1, 10 + i], 6783))
}

fn node(
    wires: &Wires,
    i: u8,
    quorum: usize,
    peers: &[u8],
) -> (
    mpsc::UnboundedSender<Command>,
    SharedRouter,
    Disk,
    tokio::task::JoinHandle<Result<(), DriverError>>,
) {
    let mut config = Config::new(format!("n{i}"), address(i));
    config.ipam = IpamMode::Ring(IpamInit::Consensus(Some(quorum)));
    let mut seed = [0u8; 32];
    seed[0] = i;
    let router = Router::new(config, None, seed, Time::ZERO).unwrap();
    let disk = Disk::default();
    let driver = Driver::new(
        router,
        wires.socket(address(i)),
        disk.clone(),
        Instant::now(),
    );
    let router = driver.router().clone();
    let (tx, rx) = mpsc::unbounded_channel();
    for p in peers {
        tx.send(Command::AddPeer(address(*p))).unwrap();
    }
    let run = tokio::task::spawn_local(driver.run(rx));
    (tx, router, disk, run)
}

async fn allocate(
    tx: &mpsc::UnboundedSender<Command>,
    container: &str,
) -> Result<Ipv4Addr, IpamError> {
    let (reply, answer) = oneshot::channel();
    tx.send(Command::Allocate {
        container: container.into(),
        reply,
    })
    .unwrap();
    answer.await.expect("driver answers")
}

fn local<F: Future>(f: F) -> F::Output {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    tokio::task::LocalSet::new().block_on(&rt, f)
}

#[test]
fn an_allocation_waits_for_the_ring_and_is_saved_before_it_is_answered() {
    local(async {
        let wires = Wires::default();
        let (a, router_a, disk_a, _) = node(&wires, 1, 2, &[2]);
        // Alone, `a` cannot seed a ring that needs two peers: the request
        // waits instead of failing.
        let pending = tokio::task::spawn_local({
            let a = a.clone();
            async move { allocate(&a, "pod-1").await }
        });
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(!pending.is_finished(), "answered without a ring");
        let (_b, router_b, _, _) = node(&wires, 2, 2, &[1]);
        let address = tokio::time::timeout(Duration::from_secs(30), pending)
            .await
            .expect("allocated once the peer is up")
            .unwrap()
            .expect("an address");
        // The answer came after the allocation was on disk.
        let saved = disk_a.saved.lock().unwrap().last().cloned().unwrap();
        let held = saved.ipam.expect("ipam state saved");
        assert!(format!("{held:?}").contains("pod-1"), "{held:?}");
        assert_eq!(
            lock(&router_a).forward(address),
            weft_core::forward::Forward::Local
        );
        // Both nodes learnt each other through the loop's sends.
        assert_eq!(lock(&router_b).established(Time::ZERO).len(), 1);
        // Asking again for the same container gives the same address.
        assert_eq!(allocate(&a, "pod-1").await, Ok(address));
    });
}

/// A lone node that seeds its own ring, over `disk`.
fn solo(
    disk: &Disk,
) -> (
    mpsc::UnboundedSender<Command>,
    tokio::task::JoinHandle<Result<(), DriverError>>,
) {
    let wires = Wires::default();
    let mut config = Config::new("solo", address(1));
    config.ipam = IpamMode::Ring(IpamInit::Consensus(Some(1)));
    let router = Router::new(config, None, [7; 32], Time::ZERO).unwrap();
    let driver = Driver::new(
        router,
        wires.socket(address(1)),
        disk.clone(),
        Instant::now(),
    );
    let (tx, rx) = mpsc::unbounded_channel();
    (tx, tokio::task::spawn_local(driver.run(rx)))
}

#[test]
fn a_disk_failing_for_two_minutes_stops_the_loop_without_answering() {
    local(async {
        let disk = Disk::default();
        let (tx, run) = solo(&disk);
        tokio::time::sleep(Duration::from_secs(1)).await;
        *disk.broken.lock().unwrap() = true;
        let started = Instant::now();
        let (reply, answer) = oneshot::channel();
        tx.send(Command::Allocate {
            container: "pod-1".into(),
            reply,
        })
        .unwrap();
        let stopped = run.await.unwrap();
        assert!(
            matches!(stopped, Err(DriverError::Persist { .. })),
            "{stopped:?}"
        );
        assert!(started.elapsed() >= save::GIVE_UP_AFTER);
        assert!(
            answer.await.is_err(),
            "an unsaved allocation was acknowledged"
        );
    });
}

#[test]
fn a_disk_that_fails_for_a_while_refuses_requests_then_serves_them() {
    local(async {
        let disk = Disk::default();
        let (tx, run) = solo(&disk);
        tokio::time::sleep(Duration::from_secs(1)).await;
        *disk.broken.lock().unwrap() = true;
        // The save this allocation needs fails: no answer, and later
        // requests are refused while saves keep failing.
        assert!(allocate_or_refused(&tx, "pod-1").await.is_none());
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert!(allocate_or_refused(&tx, "pod-2").await.is_none());
        // Questions still get answers: reading changes nothing.
        let name = read(&tx, |router, _| router.name()).await;
        assert!(name.is_some(), "a read while saves fail");
        assert!(!run.is_finished(), "stopped on a transient failure");
        assert!(
            disk.saved
                .lock()
                .unwrap()
                .iter()
                .all(|s| !format!("{s:?}").contains("pod-"))
        );
        *disk.broken.lock().unwrap() = false;
        tokio::time::sleep(save::MAX_WAIT).await;
        let first = allocate_or_refused(&tx, "pod-1")
            .await
            .expect("served again");
        assert!(first.is_ok(), "{first:?}");
        let saved = disk.saved.lock().unwrap().last().cloned().unwrap();
        assert!(format!("{saved:?}").contains("pod-1"), "{saved:?}");
        assert!(!run.is_finished());
    });
}

/// The answer to an allocation, or `None` when it was refused unanswered.
async fn allocate_or_refused(
    tx: &mpsc::UnboundedSender<Command>,
    container: &str,
) -> Option<Result<Ipv4Addr, IpamError>> {
    let (reply, answer) = oneshot::channel();
    tx.send(Command::Allocate {
        container: container.into(),
        reply,
    })
    .unwrap();
    answer.await.ok()
}

#[test]
fn dropping_every_command_sender_stops_the_loop_cleanly() {
    local(async {
        let wires = Wires::default();
        let (tx, _, disk, run) = node(&wires, 1, 1, &[]);
        tokio::time::sleep(Duration::from_secs(2)).await;
        drop(tx);
        let stopped = tokio::time::timeout(Duration::from_secs(1), run).await;
        assert!(matches!(stopped, Ok(Ok(Ok(())))), "{stopped:?}");
        assert!(
            !disk.saved.lock().unwrap().is_empty(),
            "identity saved at start"
        );
    });
}

/// Readers follow the router through published views: once an
/// allocation is answered, the view holds its space, peers appear as
/// neighbours, and `heard` times are refreshed though no route changes.
#[test]
fn views_follow_the_router_and_refresh_heard_times() {
    local(async {
        let wires = Wires::default();
        let mut config = Config::new("n1", address(1));
        config.ipam = IpamMode::Ring(IpamInit::Consensus(Some(2)));
        let router = Router::new(config, None, [1; 32], Time::ZERO).unwrap();
        let (views_tx, mut views) = watch::channel(Arc::new(router.view()));
        assert_eq!(views.borrow_and_update().gateway, None);
        let driver = Driver::new(
            router,
            wires.socket(address(1)),
            Disk::default(),
            Instant::now(),
        )
        .publish_views(views_tx);
        let (a, rx) = mpsc::unbounded_channel();
        a.send(Command::AddPeer(address(2))).unwrap();
        tokio::task::spawn_local(driver.run(rx));
        let _b = node(&wires, 2, 2, &[1]);
        let address = tokio::time::timeout(Duration::from_secs(30), allocate(&a, "pod-1"))
            .await
            .expect("allocated once the peer is up")
            .expect("an address");
        let view = views.borrow_and_update().clone();
        assert!(view.gateway.is_some(), "{view:?}");
        assert_eq!(view.forward(address), weft_core::forward::Forward::Local);
        assert_eq!(view.neighbours.len(), 1, "{view:?}");
        let heard = view.heard.clone();
        assert_eq!(heard.len(), 1, "{view:?}");
        tokio::time::timeout(Duration::from_secs(10), views.changed())
            .await
            .expect("heard times refresh")
            .unwrap();
        let later = views.borrow_and_update().clone();
        assert!(later.same_routing(&view));
        assert!(later.heard.values().zip(heard.values()).all(|(l, h)| l > h));
    });
}
