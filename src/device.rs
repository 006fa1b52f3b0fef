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
