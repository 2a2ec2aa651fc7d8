//! Which backend, device and dtype a job runs on — chosen here, once, for `train`, `eval`, `bench`, `generate` and
//! `merge`.
//!
//! A job is written once, generic over the backend ([`TrainJob`] for training, [`InferJob`] for a forward-only
//! model); [`Placement::train`] / [`Placement::infer`] pick the concrete backend type from the config's `device`
//! and `bf16`: burn-flex on the CPU, burn-cuda (with the `cuda` feature) on an NVIDIA GPU. (Gradient
//! checkpointing is not a backend: the training step recomputes layers itself, see [`crate::train::recompute`].)

use std::fmt;

use burn::backend::{Autodiff, Flex};
use burn::tensor::DType;
use serde::{de, Deserialize, Deserializer, Serialize, Serializer};

use crate::config::suggest::did_you_mean;
use crate::error::{Error, Result};
use crate::kernels::{Kernels, TrainBackend};

/// The CPU backend (burn-flex), for inference and host-side math (merges).
pub type Cpu = Flex;

/// `device`: where to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Device {
    /// CUDA device 0 when this build has CUDA and a device is present, else the CPU.
    Auto,
    /// The CPU backend (burn-flex).
    Cpu,
    /// A CUDA device by index (`cuda` = `cuda:0`).
    Cuda(usize),
    /// burn's wgpu backend (Vulkan) running the same CubeCL kernels as CUDA: a test device — Mesa's lavapipe runs
    /// it on any CPU — for dry runs of the GPU scripts without a GPU. Builds with `--features wgpu` only.
    Wgpu,
}

impl Device {
    /// Parse `cpu`, `cuda`, `cuda:N`, `auto` or `wgpu`.
    pub fn parse(s: &str) -> std::result::Result<Self, String> {
        let lower = s.trim().to_ascii_lowercase();
        match lower.as_str() {
            "auto" => return Ok(Device::Auto),
            "cpu" => return Ok(Device::Cpu),
            "cuda" | "gpu" => return Ok(Device::Cuda(0)),
            "wgpu" => return Ok(Device::Wgpu),
            _ => {}
        }
        if let Some(n) = lower.strip_prefix("cuda:") {
            if let Ok(i) = n.parse::<usize>() {
                return Ok(Device::Cuda(i));
            }
        }
        let mut msg =
            format!("unknown device `{s}`; supported: cpu, cuda, cuda:N (N = device index), auto");
        if let Some(best) = did_you_mean(&lower, ["cpu", "cuda", "auto"]) {
            msg.push_str(&format!("; did you mean `{best}`?"));
        }
        Err(msg)
    }

    /// The backend family: peers of one run must share it.
    fn kind(self) -> u8 {
        match self {
            Device::Auto => 0,
            Device::Cpu => 1,
            Device::Cuda(_) => 2,
            Device::Wgpu => 3,
        }
    }

    /// Why this binary cannot run on the device, if it cannot (a CUDA device without the `cuda` feature).
    pub fn unavailable(self) -> Option<&'static str> {
        match self {
            Device::Cuda(_) if !cfg!(feature = "cuda") => Some(
                "this loratune binary was built without CUDA; rebuild with `cargo build --release --features cuda`, or use device: cpu / auto",
            ),
            Device::Wgpu if !cfg!(feature = "wgpu") => Some(
                "wgpu is a test device (Vulkan, e.g. Mesa lavapipe) in builds with `--features wgpu` only; use device: cpu / cuda / auto",
            ),
            _ => None,
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Auto => f.write_str("auto"),
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(0) => f.write_str("cuda"),
            Device::Cuda(i) => write!(f, "cuda:{i}"),
            Device::Wgpu => f.write_str("wgpu"),
        }
    }
}

impl std::str::FromStr for Device {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Self::parse(s)
    }
}

impl Serialize for Device {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Device {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = Device;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a device (cpu, cuda, cuda:N or auto)")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> std::result::Result<Device, E> {
                Device::parse(v).map_err(E::custom)
            }
        }
        d.deserialize_str(V)
    }
}

/// `devices`: the local peers of a data-parallel run.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Devices {
    /// Every CUDA device of the machine.
    All,
    /// These devices, one peer each (a device may be listed more than once: peers then share it).
    List(Vec<Device>),
}

impl Devices {
    /// The devices, `all` resolved to the machine's CUDA devices (none without CUDA).
    pub fn resolve(&self) -> Vec<Device> {
        match self {
            Devices::All => (0..cuda_device_count()).map(Device::Cuda).collect(),
            Devices::List(v) => v.clone(),
        }
    }

    /// How many peers.
    pub fn count(&self) -> usize {
        match self {
            Devices::All => cuda_device_count(),
            Devices::List(v) => v.len(),
        }
    }

    /// Why the list cannot run, if it cannot: empty, `auto`, devices of different kinds, a device this build
    /// lacks.
    pub fn problem(&self) -> Option<String> {
        let list = self.resolve();
        if list.is_empty() {
            return Some(match self {
                Devices::All if !cfg!(feature = "cuda") => {
                    "`all` means every CUDA device, and this loratune binary was built without CUDA; list the \
                     devices (e.g. [cpu, cpu]) or rebuild with `--features cuda`"
                        .into()
                }
                Devices::All => {
                    "`all` found no CUDA device (no /proc/driver/nvidia/gpus entry); list the devices instead".into()
                }
                Devices::List(_) => "the list is empty; list one device per peer, e.g. [cuda:0, cuda:1]".into(),
            });
        }
        if list.contains(&Device::Auto) {
            return Some("`auto` cannot be a peer; name each device (cpu, cuda:N)".into());
        }
        if let Some(d) = list.iter().find(|d| d.kind() != list[0].kind()) {
            return Some(format!(
                "every peer must run on the same kind of device ({} and {d} differ)",
                list[0]
            ));
        }
        list.iter()
            .find_map(|d| d.unavailable())
            .map(str::to_string)
    }
}

impl fmt::Display for Devices {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Devices::All => f.write_str("all"),
            Devices::List(v) => {
                let names: Vec<String> = v.iter().map(Device::to_string).collect();
                write!(f, "[{}]", names.join(", "))
            }
        }
    }
}

impl Serialize for Devices {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            Devices::All => s.serialize_str("all"),
            Devices::List(v) => v.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for Devices {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> de::Visitor<'de> for V {
            type Value = Devices;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a list of devices ([cuda:0, cuda:1], [cpu, cpu]) or `all`")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> std::result::Result<Devices, E> {
                if v.trim().eq_ignore_ascii_case("all") {
                    Ok(Devices::All)
                } else {
                    Err(E::custom(format!(
                        "expected a list of devices ([cuda:0, cuda:1], [cpu, cpu]) or `all`, found `{v}`"
                    )))
                }
            }
            fn visit_seq<A: de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> std::result::Result<Devices, A::Error> {
                let mut v = Vec::new();
                while let Some(d) = seq.next_element::<Device>()? {
                    v.push(d);
                }
                Ok(Devices::List(v))
            }
        }
        d.deserialize_any(V)
    }
}

/// CUDA devices on this machine (0 without the `cuda` feature): the driver's `/proc/driver/nvidia/gpus` entries.
pub fn cuda_device_count() -> usize {
    if !cfg!(feature = "cuda") {
        return 0;
    }
    std::fs::read_dir("/proc/driver/nvidia/gpus").map_or(0, |d| d.count())
}

/// `bf16`: keep the frozen base in bf16 — `true`, `false` or `auto` (Axolotl's default: bf16 on a GPU, f32 on
/// the CPU). LoRA factors and optimizer state are f32 either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Bf16 {
    /// bf16 base weights on a GPU, f32 on the CPU.
    Auto,
    /// Always keep the frozen base in bf16.
    True,
    /// Keep everything in f32.
    False,
}

impl Serialize for Bf16 {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            Bf16::Auto => s.serialize_str("auto"),
            Bf16::True => s.serialize_bool(true),
            Bf16::False => s.serialize_bool(false),
        }
    }
}

impl<'de> Deserialize<'de> for Bf16 {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = Bf16;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("true, false or auto")
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> std::result::Result<Bf16, E> {
                Ok(if v { Bf16::True } else { Bf16::False })
            }
            fn visit_str<E: de::Error>(self, v: &str) -> std::result::Result<Bf16, E> {
                if v.eq_ignore_ascii_case("auto") {
                    Ok(Bf16::Auto)
                } else {
                    Err(E::custom(format!(
                        "expected true, false or auto, found `{v}`"
                    )))
                }
            }
        }
        d.deserialize_any(V)
    }
}

/// Keep freed tensor buffers in the heap for reuse instead of returning them to the kernel.
///
/// A training step allocates and frees hundreds of activation-sized buffers. With glibc's defaults every buffer
/// above its (adaptive) mmap threshold is a fresh `mmap` whose pages the kernel must zero on first touch — measured
/// at ~17% of a SmolLM2 LoRA step in `clear_page`. Raising the mmap threshold to its maximum (32 MiB on 64-bit) and
/// disabling trimming lets the heap recycle those buffers.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tuning parameters; called once at start-up before other threads.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 * 1024 * 1024);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_TOP_PAD, 64 * 1024 * 1024);
    }
}

/// Whether a CUDA device can be used (this build has CUDA and a driver is present).
pub fn cuda_available() -> bool {
    cfg!(feature = "cuda")
        && (std::path::Path::new("/dev/nvidiactl").exists()
            || std::path::Path::new("/proc/driver/nvidia/version").exists())
}

/// Where and in what dtype a job runs, resolved from `device` / `bf16`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    /// `Cpu` or `Cuda(i)` (never `Auto`).
    pub device: Device,
    /// The frozen base's compute dtype.
    pub dtype: DType,
}

impl Placement {
    /// Resolve the config's choices: `auto` picks CUDA device 0 when available; `bf16: auto` is bf16 on a GPU.
    pub fn resolve(device: Device, bf16: Bf16) -> Result<Placement> {
        if let Some(why) = device.unavailable() {
            return Err(Error::Config(format!("device: {device}: {why}")));
        }
        let device = match device {
            Device::Auto if cuda_available() => Device::Cuda(0),
            Device::Auto => Device::Cpu,
            d => d,
        };
        let gpu = matches!(device, Device::Cuda(_));
        let dtype = match bf16 {
            Bf16::True => DType::BF16,
            Bf16::False => DType::F32,
            Bf16::Auto if gpu => DType::BF16,
            Bf16::Auto => DType::F32,
        };
        Ok(Placement { device, dtype })
    }

    /// The CPU in f32.
    pub fn cpu() -> Placement {
        Placement {
            device: Device::Cpu,
            dtype: DType::F32,
        }
    }

    /// Run a training job on the chosen backend.
    pub fn train<J: TrainJob>(&self, job: J) -> Result<J::Output> {
        match self.device {
            #[cfg(feature = "cuda")]
            Device::Cuda(i) => {
                type Cuda = burn::backend::Cuda<f32, i32>;
                let device = burn::backend::cuda::CudaDevice::new(i);
                job.run::<Autodiff<Cuda>>(device, *self)
            }
            #[cfg(feature = "wgpu")]
            Device::Wgpu => {
                job.run::<Autodiff<burn::backend::Wgpu<f32, i32>>>(Default::default(), *self)
            }
            _ => job.run::<Autodiff<Flex>>(Default::default(), *self),
        }
    }

    /// Run a forward-only job on the chosen backend.
    pub fn infer<J: InferJob>(&self, job: J) -> Result<J::Output> {
        match self.device {
            #[cfg(feature = "cuda")]
            Device::Cuda(i) => {
                type Cuda = burn::backend::Cuda<f32, i32>;
                job.run::<Cuda>(burn::backend::cuda::CudaDevice::new(i), *self)
            }
            #[cfg(feature = "wgpu")]
            Device::Wgpu => job.run::<burn::backend::Wgpu<f32, i32>>(Default::default(), *self),
            _ => job.run::<Flex>(Default::default(), *self),
        }
    }
}

/// A data-parallel training job: one peer per device, all on the backend of `self.device`'s kind.
impl Placement {
    pub fn train_peers<J: PeersJob>(&self, devices: &[Device], job: J) -> Result<J::Output> {
        match self.device {
            #[cfg(feature = "cuda")]
            Device::Cuda(_) => {
                type Cuda = burn::backend::Cuda<f32, i32>;
                let list = devices
                    .iter()
                    .map(|d| match d {
                        Device::Cuda(i) => burn::backend::cuda::CudaDevice::new(*i),
                        _ => burn::backend::cuda::CudaDevice::new(0),
                    })
                    .collect();
                job.run::<Autodiff<Cuda>>(list, *self)
            }
            #[cfg(feature = "wgpu")]
            Device::Wgpu => job.run::<Autodiff<burn::backend::Wgpu<f32, i32>>>(
                vec![Default::default(); devices.len()],
                *self,
            ),
            _ => job.run::<Autodiff<Flex>>(vec![Default::default(); devices.len()], *self),
        }
    }
}

/// A data-parallel training job, written once for every backend: one device per local peer.
pub trait PeersJob {
    type Output;
    fn run<B: TrainBackend>(self, devices: Vec<B::Device>, at: Placement) -> Result<Self::Output>;
}

/// A training job, written once for every backend.
pub trait TrainJob {
    type Output;
    fn run<B: TrainBackend>(self, device: B::Device, at: Placement) -> Result<Self::Output>;
}

/// A forward-only job (evaluation, generation, parity checks), written once for every backend.
pub trait InferJob {
    type Output;
    fn run<B: Kernels>(self, device: B::Device, at: Placement) -> Result<Self::Output>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_parse() {
        assert_eq!(Device::parse("cuda:3"), Ok(Device::Cuda(3)));
        assert_eq!(Device::parse("cuda"), Ok(Device::Cuda(0)));
        assert_eq!(Device::parse("CPU"), Ok(Device::Cpu));
        let e = Device::parse("cdua").unwrap_err();
        assert!(e.contains("did you mean `cuda`?"), "{e}");
        assert!(Device::parse("cuda:x").is_err());
        assert_eq!(Device::Cuda(2).to_string(), "cuda:2");
        assert_eq!(Device::parse("wgpu"), Ok(Device::Wgpu));
        if !cfg!(feature = "wgpu") {
            let e = Placement::resolve(Device::Wgpu, Bf16::False).unwrap_err();
            assert!(e.to_string().contains("--features wgpu"), "{e}");
        }
    }

    #[test]
    fn placement_follows_device_and_bf16() {
        let p = Placement::resolve(Device::Cpu, Bf16::Auto).unwrap();
        assert_eq!((p.device, p.dtype), (Device::Cpu, DType::F32));
        let p = Placement::resolve(Device::Cpu, Bf16::True).unwrap();
        assert_eq!(p.dtype, DType::BF16);
        if !cfg!(feature = "cuda") {
            let e = Placement::resolve(Device::Cuda(0), Bf16::Auto).unwrap_err();
            assert!(e.to_string().contains("built without CUDA"), "{e}");
            let p = Placement::resolve(Device::Auto, Bf16::Auto).unwrap();
            assert_eq!((p.device, p.dtype), (Device::Cpu, DType::F32));
        }
    }
}
