//! Data-parallel training on burn-collective: several devices of one machine (`devices:`, one peer thread
//! each) and several machines (`nodes:`, one process each, joined by burn-collective's global orchestrator).
//!
//! Semantics are those of one device with `gradient_accumulation_steps × peers` accumulation steps:
//! - every peer reads the whole data stream in the same seeded order and takes the step's micro-batches
//!   `[rank·k, (rank+1)·k)` of the `k × peers` the step has (so the sample order does not depend on the number
//!   of peers, and a checkpoint resumes on any number of them);
//! - each micro-batch keeps its dropout stream, keyed by its index in the step, and its loss is divided by the
//!   whole step's trained tokens, so the peers' gradients sum (one all-reduce per step, in f32; the losses in f64)
//!   to the single-device token-normalised gradient;
//! - every peer then clips and runs the same AdamW update on the same sums (burn-collective has no global
//!   broadcast, and the adapters are small): the peers' adapters stay identical without sending weights;
//! - only rank 0 (node 0's first peer) writes the run folder (lock, metrics, checkpoints, exports) and asks the
//!   `eval_generate` questions; the eval loss is split over the peers like a step.
//!
//! Faults: burn-collective's all-reduce waits forever for a peer that never comes, so every wait is watched.
//! A peer thread that fails ends the run at once with its error; a node whose process died is found by probing
//! its data-service port (refused) within seconds; anything else that keeps a peer from the all-reduce (a hang,
//! a lost machine) ends the process after `ddp_timeout` seconds. Either way the error names the peer, and the
//! run resumes from its last checkpoint once every node is restarted.

use std::net::{IpAddr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs, UdpSocket};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use burn::collective::{self as coll, CollectiveConfig, PeerId, ReduceOperation};
use burn::tensor::{backend::Backend, DType, Tensor, TensorData, TensorPrimitive};
use burn_communication::Address;

use super::step::StepGradients;
use crate::config::{Device, TrainConfig};
use crate::error::{Error, Result};
use crate::kernels::TrainBackend;

/// Parse `host:port` (`[v6]:port` too).
pub fn parse_host_port(s: &str) -> std::result::Result<(String, u16), String> {
    let t = s.trim();
    let (h, p) = t
        .rsplit_once(':')
        .ok_or_else(|| format!("expected host:port (e.g. 10.0.0.1:29500), found `{s}`"))?;
    let port: u16 = p
        .parse()
        .ok()
        .filter(|&p| p > 0)
        .ok_or_else(|| format!("`{p}` is not a port number (1–65535) in `{s}`"))?;
    let host = h.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(format!(
            "expected host:port (e.g. 10.0.0.1:29500), found `{s}`"
        ));
    }
    Ok((host.to_string(), port))
}

/// Where this process's peers sit in the run.
#[derive(Debug, Clone, PartialEq)]
pub struct Layout {
    /// This node's peers, one per device.
    pub local: Vec<Device>,
    pub nodes: usize,
    pub node_rank: usize,
    /// burn-collective's orchestrator (`nodes` > 1).
    pub coordinator: Option<(String, u16)>,
    /// Node 0 starts the orchestrator itself.
    pub host_coordinator: bool,
    /// `ddp_timeout`.
    pub timeout: Duration,
}

impl Layout {
    /// The layout a (validated) config asks for.
    pub fn of(cfg: &TrainConfig) -> Result<Layout> {
        let local = match &cfg.devices {
            Some(d) => {
                if let Some(why) = d.problem() {
                    return Err(Error::Config(format!("devices: {d}: {why}")));
                }
                d.resolve()
            }
            None => vec![crate::backend::Placement::resolve(cfg.device, cfg.bf16)?.device],
        };
        let coordinator = match &cfg.coordinator {
            Some(c) => {
                Some(parse_host_port(c).map_err(|e| Error::Config(format!("coordinator: {e}")))?)
            }
            None if cfg.nodes > 1 => return Err(Error::Config(
                "several nodes need `coordinator: host:port` (node 0's address and a free port)"
                    .into(),
            )),
            None => None,
        };
        if let Some((_, port)) = &coordinator {
            let last = *port as usize + cfg.nodes;
            if last > u16::MAX as usize {
                return Err(Error::Config(format!(
                    "coordinator: port {port} leaves no room for the nodes' data services (ports {} to {last}); \
                     pick a port below {}",
                    port + 1,
                    u16::MAX as usize - cfg.nodes
                )));
            }
        }
        Ok(Layout {
            local,
            nodes: cfg.nodes.max(1),
            node_rank: cfg.node_rank,
            coordinator,
            host_coordinator: cfg.host_coordinator,
            timeout: Duration::from_secs(cfg.ddp_timeout.max(1)),
        })
    }

    /// Peers in the run.
    pub fn world(&self) -> usize {
        self.local.len() * self.nodes
    }

    /// The global rank of this node's `local`-th peer.
    pub fn rank(&self, local: usize) -> usize {
        self.node_rank * self.local.len() + local
    }

    /// Node `n`'s data-service port: the orchestrator's + 1 + n.
    fn data_port(&self, node: usize) -> Option<u16> {
        self.coordinator
            .as_ref()
            .map(|(_, p)| (*p as usize + 1 + node) as u16)
    }
}

/// torchrun's variables (`WORLD_SIZE`, `RANK`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`), when the config
/// names no nodes itself: torchrun starts one process per GPU, so each process becomes one burn-collective node
/// with one peer, on `cuda:LOCAL_RANK` (on `device: cpu`, the CPU). Returns the note to print.
pub fn apply_launcher_env(
    cfg: &mut TrainConfig,
    var: impl Fn(&str) -> Option<String>,
) -> Result<Option<String>> {
    let Some(world) = var("WORLD_SIZE") else {
        return Ok(None);
    };
    let num = |name: &str, v: &str| -> Result<usize> {
        v.trim().parse().map_err(|_| {
            Error::Config(format!("environment variable {name}={v:?} is not a number"))
        })
    };
    let world = num("WORLD_SIZE", &world)?;
    if world <= 1 || cfg.nodes > 1 || cfg.coordinator.is_some() {
        return Ok(None);
    }
    let get = |name: &str| {
        var(name).ok_or_else(|| {
            Error::Config(format!(
                "WORLD_SIZE={world} is set (a torchrun launch) but {name} is not; set it, or unset WORLD_SIZE and \
                 use the config's nodes / node_rank / coordinator"
            ))
        })
    };
    let rank = num("RANK", &get("RANK")?)?;
    let local_rank = match var("LOCAL_RANK") {
        Some(v) => num("LOCAL_RANK", &v)?,
        None => 0,
    };
    let addr = get("MASTER_ADDR")?;
    let port = get("MASTER_PORT")?;
    if rank >= world {
        return Err(Error::Config(format!(
            "RANK={rank} is not below WORLD_SIZE={world}"
        )));
    }
    if cfg.devices.as_ref().is_some_and(|d| d.count() > 1) {
        return Err(Error::Config(format!(
            "devices: {} lists several peers, but under torchrun (WORLD_SIZE={world}) each process is one peer; \
             remove `devices`, or start one loratune per machine without torchrun",
            cfg.devices.as_ref().map(ToString::to_string).unwrap_or_default()
        )));
    }
    let device = match cfg.device {
        Device::Cpu => Device::Cpu,
        _ => Device::Cuda(local_rank),
    };
    cfg.devices = Some(crate::config::Devices::List(vec![device]));
    cfg.nodes = world;
    cfg.node_rank = rank;
    cfg.coordinator = Some(format!("{addr}:{port}"));
    Ok(Some(format!(
        "torchrun: process {rank} of {world} (LOCAL_RANK {local_rank}) → burn-collective node {rank} of {world}, one \
         peer on {device}; orchestrator {addr}:{port}"
    )))
}

/// One peer of a running group: its place, and the collective operations the training loop needs.
pub struct Peer {
    /// Global rank (`node_rank × local peers + local index`); rank 0 writes the run folder.
    pub rank: usize,
    pub world: usize,
    /// Index among this node's peers.
    pub local: usize,
    pub node: usize,
    pub device: Device,
    id: PeerId,
    group: Arc<Group>,
}

impl Peer {
    /// Whether this peer writes the run folder and prints.
    pub fn writes(&self) -> bool {
        self.rank == 0
    }

    /// This peer's micro-batches among a step's `n`: a contiguous block, in rank order.
    pub fn share(&self, n: usize) -> Range<usize> {
        self.rank * n / self.world..(self.rank + 1) * n / self.world
    }

    /// This peer's name in messages.
    pub fn name(&self) -> String {
        peer_name(self.rank, self.world, self.node, self.device)
    }

    /// Serialise this node's peers' setup (one tokenises and caches the data, the others reuse the cache).
    pub fn setup_turn(&self) -> MutexGuard<'_, ()> {
        self.group.setup.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sum `v` over the peers (watched: see the module's faults).
    fn all_reduce<B: Backend>(&self, v: Tensor<B, 1>, what: &str) -> Result<Tensor<B, 1>> {
        self.group.watch.begin(self.local, what);
        let r = coll::all_reduce::<B>(self.id, v.into_primitive().tensor(), ReduceOperation::Sum);
        self.group.watch.end(self.local);
        r.map(|t| Tensor::from_primitive(TensorPrimitive::Float(t)))
            .map_err(|e| {
                // burn-collective fails without saying which peer is missing: look for a node that is gone
                // (for a moment: a killed process's sockets close while it is torn down).
                let mut gone = Vec::new();
                for _ in 0..10 {
                    gone = self.group.watch.gone_nodes();
                    if !gone.is_empty() || self.group.layout.nodes == 1 {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
                let why = match gone.first() {
                    Some(gone) => format!("{gone} (burn-collective: {e:?})"),
                    None => format!("burn-collective: {e:?}"),
                };
                Error::Train(format!(
                    "{}: the all-reduce of {what} failed: {why}. {RESTART}",
                    self.name()
                ))
            })
    }

    /// Sum a few numbers over the peers, in f64 (exact for integers below 2^53).
    pub fn sum_f64<B: Backend>(
        &self,
        v: &[f64],
        what: &str,
        device: &B::Device,
    ) -> Result<Vec<f64>> {
        let t =
            Tensor::<B, 1>::from_data(TensorData::new(v.to_vec(), [v.len()]), (device, DType::F64));
        let s = self.all_reduce(t, what)?.into_data();
        s.convert::<f64>().to_vec::<f64>().map_err(|e| {
            Error::Train(format!(
                "{}: reading the all-reduced {what}: {e:?}",
                self.name()
            ))
        })
    }

    /// Replace one step's gradients, loss and load-balancing loss with their sums over the peers. A parameter
    /// no peer has a gradient for (an expert no token was routed to) stays `None`.
    pub fn sum_gradients<TB: TrainBackend>(
        &self,
        g: &mut StepGradients<TB>,
        shapes: &[[usize; 2]],
        step: u64,
    ) -> Result<()> {
        let device = g
            .grads
            .iter()
            .flatten()
            .next()
            .map(|t| t.device())
            .ok_or_else(|| {
                Error::Train(format!(
                    "{}: step {step}: no gradient to share",
                    self.name()
                ))
            })?;
        // One flat vector in the accumulators' dtype (f64 where the backend has it: see `step::add_gradient`),
        // led by a presence flag per parameter.
        let dtype = g
            .grads
            .iter()
            .flatten()
            .next()
            .map_or(DType::F32, |t| t.dtype());
        let what = format!("step {step}'s gradients");
        let flags: Vec<f64> = g
            .grads
            .iter()
            .map(|t| f64::from(u8::from(t.is_some())))
            .collect();
        let mut parts = vec![Tensor::<TB::InnerBackend, 1>::from_data(
            TensorData::new(flags, [shapes.len()]),
            (&device, dtype),
        )];
        for (slot, &[r, c]) in g.grads.iter_mut().zip(shapes) {
            parts.push(match slot.take() {
                Some(t) => t.reshape([r * c]),
                None => Tensor::zeros([r * c], (&device, dtype)),
            });
        }
        let sum = self.all_reduce(Tensor::cat(parts, 0), &what)?;
        let flags = sum
            .clone()
            .slice(0..shapes.len())
            .into_data()
            .convert::<f64>()
            .to_vec::<f64>()
            .map_err(|e| Error::Train(format!("{}: {what}: {e:?}", self.name())))?;
        let mut at = shapes.len();
        for ((slot, &[r, c]), flag) in g.grads.iter_mut().zip(shapes).zip(flags) {
            let part = sum.clone().slice(at..at + r * c);
            at += r * c;
            *slot = (flag > 0.0).then(|| part.reshape([r, c]));
        }
        let s = self.sum_f64::<TB::InnerBackend>(
            &[g.loss, g.aux_loss.unwrap_or(0.0)],
            &format!("step {step}'s loss"),
            &device,
        )?;
        g.loss = s[0];
        if let Some(a) = &mut g.aux_loss {
            *a = s[1];
        }
        Ok(())
    }

    /// Check before the first step that every peer runs the same configuration from the same point and that the
    /// ranks are exactly `0..world`, and learn the other nodes' data-service addresses (for the watchdog).
    pub fn handshake<B: Backend>(
        &self,
        config_hash: &str,
        resume_step: u64,
        device: &B::Device,
    ) -> Result<()> {
        let hash = u64::from_str_radix(config_hash, 16).unwrap_or(0);
        let mine = [
            1.0,
            self.world as f64,
            (hash >> 32) as f64,
            (hash & 0xffff_ffff) as f64,
            resume_step as f64,
        ];
        let s = self.sum_f64::<B>(&mine, "the start-up check", device)?;
        let n = self.world as f64;
        if s[0] != n || s[1] != n * n {
            return Err(Error::Config(format!(
                "{}: the peers disagree on the run's size: {} peers joined, this node expects {} ({} per node × {} \
                 nodes); every node needs the same number of `devices` and the same `nodes`",
                self.name(),
                s[0],
                self.world,
                self.group.layout.local.len(),
                self.group.layout.nodes
            )));
        }
        if s[2] != n * mine[2] || s[3] != n * mine[3] {
            return Err(Error::Config(format!(
                "{}: the peers do not train the same configuration (this node's config_hash is {config_hash}); give \
                 every node the same config file and overrides",
                self.name()
            )));
        }
        if s[4] != n * mine[4] {
            return Err(Error::Config(format!(
                "{}: the peers start from different steps (this node from step {resume_step}, the mean is {:.1}); \
                 every node must see the same checkpoints: keep output_dir on storage all nodes share, or copy the \
                 checkpoint folder to each node",
                self.name(),
                s[4] / n
            )));
        }
        // Ranks and addresses: each peer marks its rank; each node's first peer adds its data-service address.
        let nodes = self.group.layout.nodes;
        let mut v = vec![0.0f64; self.world + nodes * 9];
        v[self.rank] = 1.0;
        if self.local == 0 {
            if let Some(a) = self.group.node_address {
                let ip = match a.ip() {
                    IpAddr::V4(x) => x.to_ipv6_mapped(),
                    IpAddr::V6(x) => x,
                };
                let at = self.world + self.node * 9;
                for (i, seg) in ip.segments().iter().enumerate() {
                    v[at + i] = f64::from(*seg);
                }
                v[at + 8] = f64::from(a.port());
            }
        }
        let s = self.sum_f64::<B>(&v, "the peers' addresses", device)?;
        if let Some(r) = (0..self.world).find(|&r| s[r] != 1.0) {
            return Err(Error::Config(format!(
                "{}: rank {r} was claimed by {} peers; every node needs its own node_rank in 0..{nodes}",
                self.name(),
                s[r]
            )));
        }
        if nodes > 1 {
            let mut remote = Vec::new();
            for node in (0..nodes).filter(|&n| n != self.node) {
                let at = self.world + node * 9;
                let mut seg = [0u16; 8];
                for (i, x) in seg.iter_mut().enumerate() {
                    *x = s[at + i] as u16;
                }
                let ip = Ipv6Addr::from(seg);
                let ip = ip.to_ipv4_mapped().map_or(IpAddr::V6(ip), IpAddr::V4);
                remote.push((node, SocketAddr::new(ip, s[at + 8] as u16)));
            }
            *self
                .group
                .watch
                .remote
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = remote;
        }
        Ok(())
    }
}

fn peer_name(rank: usize, world: usize, node: usize, device: Device) -> String {
    format!("peer {rank} of {world} (node {node}, {device})")
}

/// What a node's peers share.
struct Group {
    layout: Layout,
    watch: Arc<Watch>,
    setup: Mutex<()>,
    /// This node's data service (several nodes).
    node_address: Option<SocketAddr>,
}

/// The watchdog's view: which peer waits since when for what, and the other nodes' data services.
struct Watch {
    timeout: Duration,
    node: usize,
    devices: Vec<Device>,
    world: usize,
    waiting: Mutex<Vec<Option<(Instant, String)>>>,
    remote: Mutex<Vec<(usize, SocketAddr)>>,
    stopped: AtomicBool,
}

impl Watch {
    fn begin(&self, local: usize, what: &str) {
        self.waiting.lock().unwrap_or_else(|e| e.into_inner())[local] =
            Some((Instant::now(), what.to_string()));
    }

    fn end(&self, local: usize) {
        self.waiting.lock().unwrap_or_else(|e| e.into_inner())[local] = None;
    }

    /// Runs until stopped; ends the process when a wait outlives the timeout or another node is gone.
    fn run(self: Arc<Self>) {
        const TICK: Duration = Duration::from_millis(200);
        const PROBE_AFTER: Duration = Duration::from_secs(3);
        let mut last_probe = Instant::now();
        let mut unreachable = vec![0u32; 0];
        while !self.stopped.load(Ordering::Relaxed) {
            std::thread::sleep(TICK);
            let oldest = {
                let w = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
                w.iter()
                    .enumerate()
                    .filter_map(|(i, x)| x.as_ref().map(|(t, what)| (i, *t, what.clone())))
                    .min_by_key(|(_, t, _)| *t)
            };
            let Some((local, since, what)) = oldest else {
                continue;
            };
            let rank = self.node * self.devices.len() + local;
            let me = peer_name(rank, self.world, self.node, self.devices[local]);
            if since.elapsed() > self.timeout {
                self.fail(&format!(
                    "{me} waited {} s (ddp_timeout) for the other peers at {what}: a peer died, hangs, or cannot be \
                     reached (raise ddp_timeout if node 0 answers long eval_generate questions alone)",
                    self.timeout.as_secs()
                ))
            }
            if since.elapsed() < PROBE_AFTER || last_probe.elapsed() < Duration::from_secs(2) {
                continue;
            }
            last_probe = Instant::now();
            let remote = self
                .remote
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            unreachable.resize(remote.len(), 0);
            for (i, (node, addr)) in remote.iter().enumerate() {
                match probe(*node, addr) {
                    Probe::Alive => unreachable[i] = 0,
                    Probe::Gone(why) => self.fail(&format!("{me} waits at {what}, and {why}")),
                    Probe::Unreachable(why) => {
                        unreachable[i] += 1;
                        if unreachable[i] >= 3 {
                            self.fail(&format!("{me} waits at {what}, and {why}"));
                        }
                    }
                }
            }
        }
    }

    /// The other nodes whose data service refuses connections, described.
    fn gone_nodes(&self) -> Vec<String> {
        let remote = self
            .remote
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        remote
            .iter()
            .filter_map(|(node, addr)| match probe(*node, addr) {
                Probe::Gone(why) => Some(why),
                _ => None,
            })
            .collect()
    }

    fn fail(&self, msg: &str) -> ! {
        eprintln!("error: {msg}. {RESTART}");
        std::process::exit(1)
    }
}

/// What a failed run tells the user to do.
const RESTART: &str = "The run stops on every node; restart all nodes with the same config \
                       (auto_resume_from_checkpoints: true continues from the last checkpoint)";

enum Probe {
    Alive,
    /// Refused: the node's process ended.
    Gone(String),
    /// No answer (a lost machine or network), or another error.
    Unreachable(String),
}

/// Whether node `node`'s data service at `addr` still accepts connections.
fn probe(node: usize, addr: &SocketAddr) -> Probe {
    match TcpStream::connect_timeout(addr, Duration::from_secs(2)) {
        Ok(_) => Probe::Alive,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Probe::Gone(format!(
            "node {node} is gone: its data service {addr} refuses connections (its process ended)"
        )),
        Err(e) => Probe::Unreachable(format!("node {node} ({addr}) cannot be reached: {e}")),
    }
}

/// burn's collective layer logs every transfer at `info` (and installs a subscriber printing them unless one is
/// there): show `warn` and above, or what `LORATUNE_LOG` (an `EnvFilter` directive) asks for.
pub fn quiet_collective_logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("LORATUNE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
    // burn's communication tasks panic (inside tokio, which catches it) when a peer's connection drops; the
    // all-reduce then fails and the error loratune prints names the node that is gone. Their panic messages
    // are shown only with LORATUNE_LOG set.
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let runtime = std::thread::current()
                .name()
                .is_some_and(|n| n.starts_with("tokio-"));
            if !runtime || std::env::var_os("LORATUNE_LOG").is_some() {
                previous(info);
            }
        }));
    });
}

/// One data-parallel group at a time per process (burn-collective's local server is one per backend).
static ONE_GROUP: Mutex<()> = Mutex::new(());

/// Run `work` once per local peer of `layout`, each on its own thread with its [`Peer`] (registered with
/// burn-collective on backend `B` — the backend whose tensors the peers sum), and return the first local peer's
/// result. The first peer to fail ends the group with its error (its peers may be left waiting: the process is
/// expected to exit).
pub fn run_peers<B: Backend, T: Send + 'static>(
    layout: &Layout,
    devices: Vec<B::Device>,
    work: impl Fn(Peer, B::Device) -> Result<T> + Send + Sync + 'static,
) -> Result<T> {
    let _one = ONE_GROUP.lock().unwrap_or_else(|e| e.into_inner());
    quiet_collective_logs();
    coll::reset_collective::<B>();
    let n = layout.local.len();
    let world = layout.world();
    let mut config = CollectiveConfig::default().with_num_devices(n);
    let mut node_address = None;
    if layout.nodes > 1 {
        let (host, port) = layout
            .coordinator
            .clone()
            .ok_or_else(|| Error::Config("several nodes need `coordinator: host:port`".into()))?;
        let data_port = layout.data_port(layout.node_rank).unwrap_or(port);
        check_port_free(
            data_port,
            "this node's data service (coordinator port + 1 + node_rank)",
        )?;
        if layout.node_rank == 0 && layout.host_coordinator {
            // Once per process and port: a sweep's trials reuse the orchestrator the first one started.
            static HOSTED: Mutex<Vec<u16>> = Mutex::new(Vec::new());
            let mut hosted = HOSTED.lock().unwrap_or_else(|e| e.into_inner());
            if !hosted.contains(&port) {
                check_port_free(
                    port,
                    "the coordinator (set host_coordinator: false to join a `loratune coordinator` there)",
                )?;
                std::thread::spawn(move || {
                    serve_coordinator(port);
                    // The orchestrator returns on Ctrl-C / SIGTERM (it installs the handlers): end the run too.
                    eprintln!("interrupted");
                    std::process::exit(130);
                });
                hosted.push(port);
            }
        }
        if layout.node_rank > 0 || !layout.host_coordinator {
            wait_for_coordinator(&host, port, layout.timeout)?;
        }
        let ip = local_ip_towards(&host, port)?;
        node_address = Some(SocketAddr::new(ip, data_port));
        let ws = |h: &str, p: u16| -> Result<Address> {
            let h = if h.contains(':') {
                format!("[{h}]")
            } else {
                h.to_string()
            };
            format!("ws://{h}:{p}")
                .parse()
                .map_err(|e: String| Error::Config(format!("coordinator: {e}")))
        };
        config = config
            .with_num_nodes(layout.nodes as u32)
            .with_global_address(ws(&host, port)?)
            .with_node_address(ws(&ip.to_string(), data_port)?)
            .with_data_service_port(data_port);
    }
    let watch = Arc::new(Watch {
        timeout: layout.timeout,
        node: layout.node_rank,
        devices: layout.local.clone(),
        world,
        waiting: Mutex::new(vec![None; n]),
        remote: Mutex::new(Vec::new()),
        stopped: AtomicBool::new(false),
    });
    std::thread::spawn({
        let w = watch.clone();
        move || w.run()
    });
    let group = Arc::new(Group {
        layout: layout.clone(),
        watch: watch.clone(),
        setup: Mutex::new(()),
        node_address,
    });
    let work = Arc::new(work);
    let (tx, rx) = mpsc::channel::<(usize, Result<T>)>();
    let mut handles = Vec::new();
    for (local, dev) in devices.into_iter().enumerate() {
        let (tx, work, group, config) = (tx.clone(), work.clone(), group.clone(), config.clone());
        let rank = layout.rank(local);
        let device = layout.local[local];
        let name = peer_name(rank, world, layout.node_rank, device);
        let starting = format!("starting {name}");
        let h = std::thread::Builder::new()
            .name(format!("peer-{rank}"))
            .spawn(move || {
                let id = PeerId::from(rank);
                let peer = Peer {
                    rank,
                    world,
                    local,
                    node: group.layout.node_rank,
                    device,
                    id,
                    group: group.clone(),
                };
                let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    group.watch.begin(local, "registration with the other peers");
                    let r = coll::register::<B>(id, dev.clone(), config);
                    group.watch.end(local);
                    r.map_err(|e| {
                        let why = match format!("{e:?}") {
                            d if d.contains("RegisterParamsMismatch") => {
                                "the nodes disagree on the run's layout (`nodes`, or the number of `devices`): give \
                                 every node the same config"
                                    .to_string()
                            }
                            d if d.contains("DoubleRegister") => {
                                "two nodes registered with the same address: each node needs its own node_rank — \
                                 or the coordinator still holds the nodes of a run that failed (restart a \
                                 `loratune coordinator` after a failed run; one hosted by node 0 restarts with it)"
                                    .to_string()
                            }
                            d => format!("burn-collective: {d}"),
                        };
                        Error::Train(format!("{name}: the registration with the other peers failed: {why}"))
                    })?;
                    let out = work(peer, dev)?;
                    group.watch.begin(local, "the end of the run");
                    let f = coll::finish_collective::<B>(id);
                    group.watch.end(local);
                    f.map_err(|e| Error::Train(format!("{name}: leaving the group: {e:?}")))?;
                    Ok(out)
                }))
                .unwrap_or_else(|p| {
                    let msg = p
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_default();
                    Err(Error::Train(format!("{name} panicked: {msg}")))
                });
                let _ = tx.send((local, result));
            })
            .map_err(|e| Error::Train(format!("{starting}: {e}")))?;
        handles.push(Some(h));
    }
    drop(tx);
    let mut first = None;
    for _ in 0..n {
        let Ok((local, r)) = rx.recv() else {
            break;
        };
        match r {
            Ok(v) => {
                if let Some(h) = handles[local].take() {
                    let _ = h.join();
                }
                if local == 0 {
                    first = Some(v);
                }
            }
            Err(e) => {
                watch.stopped.store(true, Ordering::Relaxed);
                return Err(e);
            }
        }
    }
    if layout.nodes > 1 && layout.node_rank == 0 && layout.host_coordinator {
        // The orchestrator lives in this process: let the other nodes leave the group before it goes.
        let remote = watch
            .remote
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let until = Instant::now() + layout.timeout.min(Duration::from_secs(60));
        for (_, addr) in remote {
            while Instant::now() < until
                && TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok()
            {
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
    watch.stopped.store(true, Ordering::Relaxed);
    first.ok_or_else(|| Error::Train("the group's first peer returned nothing".into()))
}

/// Wait until the orchestrator at `host:port` accepts connections (node 0 may start after this node), at most
/// `limit`; then a clear error rather than burn-collective's endless retries.
fn wait_for_coordinator(host: &str, port: u16, limit: Duration) -> Result<()> {
    let t0 = Instant::now();
    let mut said = Instant::now();
    loop {
        let addrs: Vec<SocketAddr> = (host, port)
            .to_socket_addrs()
            .map(Iterator::collect)
            .unwrap_or_default();
        let last = match addrs.first() {
            Some(a) => match TcpStream::connect_timeout(a, Duration::from_secs(2)) {
                Ok(_) => return Ok(()),
                Err(e) => e.to_string(),
            },
            None => format!("`{host}` does not resolve"),
        };
        if t0.elapsed() >= limit {
            return Err(Error::Config(format!(
                "coordinator {host}:{port} did not answer within {} s (ddp_timeout): {last}; start node 0 (it \
                 starts the orchestrator), or `loratune coordinator --port {port}` there with host_coordinator: \
                 false, and check that the port is open between the machines",
                limit.as_secs()
            )));
        }
        if said.elapsed() >= Duration::from_secs(10) {
            eprintln!("waiting for the coordinator at {host}:{port} ({last}) …");
            said = Instant::now();
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Fail early, with the key to change, when a port this node must listen on is taken.
fn check_port_free(port: u16, what: &str) -> Result<()> {
    TcpListener::bind(("0.0.0.0", port)).map(drop).map_err(|e| {
        Error::Config(format!(
            "port {port} for {what} cannot be opened: {e}; another run or coordinator uses it — pick another \
             `coordinator` port"
        ))
    })
}

/// The address of this machine's interface towards `host` (no packet is sent).
fn local_ip_towards(host: &str, port: u16) -> Result<IpAddr> {
    let target = (host, port)
        .to_socket_addrs()
        .map_err(|e| Error::Config(format!("coordinator: cannot resolve `{host}`: {e}")))?
        .next()
        .ok_or_else(|| Error::Config(format!("coordinator: `{host}` has no address")))?;
    let bind = if target.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    };
    let s = UdpSocket::bind(bind)
        .and_then(|s| s.connect(target).map(|()| s))
        .and_then(|s| s.local_addr())
        .map_err(|e| Error::Config(format!("coordinator: no route to {target}: {e}")))?;
    Ok(s.ip())
}

/// Serve burn-collective's global orchestrator on `port` until Ctrl-C / SIGTERM.
pub fn serve_coordinator(port: u16) {
    match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt.block_on(burn_collective::start_global_orchestrator(port)),
        Err(e) => eprintln!("error: starting the coordinator's runtime: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port() {
        assert_eq!(
            parse_host_port("10.0.0.1:29500"),
            Ok(("10.0.0.1".into(), 29500))
        );
        assert_eq!(parse_host_port("[::1]:80"), Ok(("::1".into(), 80)));
        assert!(parse_host_port("10.0.0.1")
            .unwrap_err()
            .contains("host:port"));
        assert!(parse_host_port("h:0").unwrap_err().contains("port number"));
        assert!(parse_host_port(":9").is_err());
    }

    #[test]
    fn shares_cover_the_step_in_order() {
        for world in 1..5 {
            for n in [world, 2 * world, 3 * world] {
                let mut next = 0;
                for rank in 0..world {
                    let r = rank * n / world..(rank + 1) * n / world;
                    assert_eq!(r.start, next);
                    assert_eq!(r.len(), n / world);
                    next = r.end;
                }
                assert_eq!(next, n);
            }
        }
    }

    #[test]
    fn torchrun_variables_become_nodes() {
        let mut cfg = TrainConfig::default();
        let env = |k: &str| {
            [
                ("WORLD_SIZE", "4"),
                ("RANK", "2"),
                ("LOCAL_RANK", "0"),
                ("MASTER_ADDR", "10.1.2.3"),
                ("MASTER_PORT", "29500"),
            ]
            .iter()
            .find(|(n, _)| *n == k)
            .map(|(_, v)| v.to_string())
        };
        let note = apply_launcher_env(&mut cfg, env).unwrap().unwrap();
        assert!(note.contains("node 2 of 4"), "{note}");
        assert_eq!((cfg.nodes, cfg.node_rank), (4, 2));
        assert_eq!(cfg.coordinator.as_deref(), Some("10.1.2.3:29500"));
        assert_eq!(
            cfg.devices,
            Some(crate::config::Devices::List(vec![Device::Cuda(0)]))
        );
        // A missing variable is named.
        let mut cfg = TrainConfig::default();
        let e = apply_launcher_env(&mut cfg, |k| (k == "WORLD_SIZE").then(|| "2".to_string()))
            .unwrap_err();
        assert!(e.to_string().contains("RANK"), "{e}");
        // WORLD_SIZE=1 and the config's own nodes win.
        let mut cfg = TrainConfig::default();
        assert!(
            apply_launcher_env(&mut cfg, |k| (k == "WORLD_SIZE").then(|| "1".into()))
                .unwrap()
                .is_none()
        );
    }
}
