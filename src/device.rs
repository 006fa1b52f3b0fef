//! Naming devices in configuration and on command lines: `cpu`, `cuda:N`,
//! `metal:N`.
//!
//! # Examples
//!
//! ```
//! use candle_core::DeviceLocation;
//! use candlewick::device::{format_location, parse_location, parse_locations};
//!
//! assert_eq!(parse_location("cuda:1")?, DeviceLocation::Cuda { gpu_id: 1 });
//! assert_eq!(parse_locations("cpu, metal:0")?.len(), 2);
//! assert_eq!(format_location(DeviceLocation::Cpu), "cpu");
//! # Ok::<_, candlewick::device::ParseDeviceError>(())
//! ```

use std::fmt;

use candle_core::{Device, DeviceLocation};

/// The text of a device name that is not `cpu`, `cuda:N` or `metal:N`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseDeviceError {
    input: String,
}

impl fmt::Display for ParseDeviceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid device {:?}: expected `cpu`, `cuda:N` or `metal:N`",
            self.input
        )
    }
}

impl std::error::Error for ParseDeviceError {}

/// Parses `cpu`, `cuda`, `cuda:N`, `metal` or `metal:N` (case-insensitive;
/// a missing ordinal means 0).
pub fn parse_location(name: &str) -> Result<DeviceLocation, ParseDeviceError> {
    let error = || ParseDeviceError {
        input: name.to_owned(),
    };
    let lower = name.trim().to_ascii_lowercase();
    let (kind, ordinal) = match lower.split_once(':') {
        Some((kind, ordinal)) => (kind, ordinal.parse::<usize>().map_err(|_| error())?),
        None => (lower.as_str(), 0),
    };
    match kind {
        "cpu" if !lower.contains(':') => Ok(DeviceLocation::Cpu),
        "cuda" => Ok(DeviceLocation::Cuda { gpu_id: ordinal }),
        "metal" => Ok(DeviceLocation::Metal { gpu_id: ordinal }),
        _ => Err(error()),
    }
}

/// Parses a comma-separated list of device names.
pub fn parse_locations(names: &str) -> Result<Vec<DeviceLocation>, ParseDeviceError> {
    names
        .split(',')
        .filter(|name| !name.trim().is_empty())
        .map(parse_location)
        .collect()
}

/// The name [`parse_location`] reads back.
pub fn format_location(location: DeviceLocation) -> String {
    match location {
        DeviceLocation::Cpu => "cpu".to_owned(),
        DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

/// Why this build cannot run replicas on `location` at all, if it cannot:
/// candle was compiled without the backend it needs. Retrying cannot help.
pub fn unsupported(location: DeviceLocation) -> Option<&'static str> {
    match location {
        DeviceLocation::Cpu => None,
        DeviceLocation::Cuda { .. } if !candle_core::utils::cuda_is_available() => {
            Some("this build has no CUDA support (enable candlewick's `cuda` feature)")
        }
        DeviceLocation::Metal { .. } if !candle_core::utils::metal_is_available() => {
            Some("this build has no Metal support (enable candlewick's `metal` feature)")
        }
        DeviceLocation::Cuda { .. } | DeviceLocation::Metal { .. } => None,
    }
}

/// Opens the candle device for `location` on the current thread (a GPU
/// context belongs to the thread that uses it).
pub(crate) fn open(location: DeviceLocation) -> candle_core::Result<Device> {
    match location {
        DeviceLocation::Cpu => Ok(Device::Cpu),
        DeviceLocation::Cuda { gpu_id } => Device::new_cuda(gpu_id),
        DeviceLocation::Metal { gpu_id } => Device::new_metal(gpu_id),
    }
}

/// The environment variables candle reads its CPU thread count from:
/// `RAYON_NUM_THREADS` for matrix multiplies (on every call), and
/// `CANDLE_NUM_THREADS` (else the former) for its own pool of element-wise
/// kernels (once, at first use).
pub const CANDLE_THREAD_VARS: [&str; 2] = ["RAYON_NUM_THREADS", "CANDLE_NUM_THREADS"];

/// The number of threads candle splits a CPU matrix multiply for, as it
/// reads it now: `RAYON_NUM_THREADS`, else the number of physical cores.
///
/// A replica confined to a rayon pool of `n` threads
/// ([`cpu_threads_per_replica`](crate::pool::PoolConfig::cpu_threads_per_replica))
/// computes at that parallelism only if this is `n` too; otherwise candle
/// splits each kernel for more threads than the pool has.
pub fn candle_cpu_threads() -> usize {
    candle_core::utils::get_num_threads()
}

/// Makes candle's CPU thread count `threads` for this process: returns at
/// once if [`CANDLE_THREAD_VARS`] already say so, and otherwise re-executes
/// the current program, with the same arguments, with them set.
///
/// candle reads its thread count from the environment, and a library cannot
/// change the environment of a running process soundly (other threads may be
/// reading it), so this is a launcher step: call it first thing in `main`,
/// before any thread starts. On success it does not return on Unix (the
/// process image is replaced); it returns the error if that fails, and an
/// `Unsupported` error on other platforms, where the variables must be set by
/// whatever starts the process. The generated Kubernetes Deployment sets
/// them, so the re-execution is skipped there.
///
/// # Examples
///
/// ```no_run
/// use std::num::NonZeroUsize;
///
/// // One single-threaded replica per core: candle must split for one thread.
/// let threads = NonZeroUsize::MIN;
/// if let Err(err) = candlewick::device::align_candle_threads(threads) {
///     eprintln!("candle keeps {} threads: {err}", candlewick::device::candle_cpu_threads());
/// }
/// ```
pub fn align_candle_threads(threads: std::num::NonZeroUsize) -> std::io::Result<()> {
    let wanted = threads.to_string();
    let aligned = CANDLE_THREAD_VARS
        .iter()
        .all(|var| std::env::var(var).is_ok_and(|value| value.trim() == wanted));
    if aligned {
        return Ok(());
    }
    relaunch(&wanted)
}

#[cfg(unix)]
fn relaunch(threads: &str) -> std::io::Result<()> {
    use std::os::unix::process::CommandExt;
    let mut args = std::env::args_os();
    let mut command = std::process::Command::new(std::env::current_exe()?);
    if let Some(arg0) = args.next() {
        command.arg0(arg0);
    }
    for var in CANDLE_THREAD_VARS {
        command.env(var, threads);
    }
    Err(command.args(args).exec())
}

#[cfg(not(unix))]
fn relaunch(_: &str) -> std::io::Result<()> {
    Err(std::io::Error::new(
        std::io::ErrorKind::Unsupported,
        "cannot re-execute the process here: set RAYON_NUM_THREADS and CANDLE_NUM_THREADS before it starts",
    ))
}

#[cfg(feature = "serde")]
pub(crate) mod serde_locations {
    use candle_core::DeviceLocation;
    use serde::{Deserialize, Deserializer, Serializer, de::Error as _, ser::SerializeSeq};

    pub(crate) fn serialize<S: Serializer>(
        locations: &[DeviceLocation],
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        let mut seq = serializer.serialize_seq(Some(locations.len()))?;
        for &location in locations {
            seq.serialize_element(&super::format_location(location))?;
        }
        seq.end()
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Vec<DeviceLocation>, D::Error> {
        Vec::<String>::deserialize(deserializer)?
            .iter()
            .map(|name| super::parse_location(name).map_err(D::Error::custom))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for location in [
            DeviceLocation::Cpu,
            DeviceLocation::Cuda { gpu_id: 3 },
            DeviceLocation::Metal { gpu_id: 0 },
        ] {
            assert_eq!(parse_location(&format_location(location)), Ok(location));
        }
    }

    #[test]
    fn the_cpu_is_always_supported() {
        assert_eq!(unsupported(DeviceLocation::Cpu), None);
        assert_eq!(
            unsupported(DeviceLocation::Cuda { gpu_id: 0 }).is_some(),
            !cfg!(feature = "cuda")
        );
    }

    #[test]
    fn bad_names_are_rejected() {
        for name in ["gpu", "cuda:x", "cpu:1", "", "cuda:-1"] {
            assert!(parse_location(name).is_err(), "{name:?} was accepted");
        }
        assert_eq!(
            parse_location("CUDA"),
            Ok(DeviceLocation::Cuda { gpu_id: 0 })
        );
    }
}
