//! Envoy's response flags: why a request ended as it did. Kept as a set while the request is
//! served and rendered only for the access log and the metric label (`UT,URX`, in Envoy's
//! order, `-` for none).
use std::fmt;

/// One flag, named as Envoy's `StreamInfo::CoreResponseFlag`; the discriminant is Envoy's
/// position, which orders the rendering.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ResponseFlag {
    NoHealthyUpstream = 1,
    UpstreamRequestTimeout = 2,
    UpstreamRemoteReset = 4,
    UpstreamConnectionFailure = 5,
    UpstreamConnectionTermination = 6,
    UpstreamOverflow = 7,
    NoRouteFound = 8,
    DelayInjected = 9,
    FaultInjected = 10,
    DownstreamConnectionTermination = 14,
    UpstreamRetryLimitExceeded = 15,
    DownstreamProtocolError = 18,
    UpstreamProtocolError = 23,
    NoClusterFound = 24,
    /// Not an Envoy flag (Envoy's RBAC filter says `rbac_access_denied` in the response code
    /// details); nodeway's label for a request its HTTP authorization denied. Rendered last.
    RbacAccessDenied = 31,
}

impl ResponseFlag {
    /// Envoy's short name.
    pub fn short(self) -> &'static str {
        match self {
            ResponseFlag::NoHealthyUpstream => "UH",
            ResponseFlag::UpstreamRequestTimeout => "UT",
            ResponseFlag::UpstreamRemoteReset => "UR",
            ResponseFlag::UpstreamConnectionFailure => "UF",
            ResponseFlag::UpstreamConnectionTermination => "UC",
            ResponseFlag::UpstreamOverflow => "UO",
            ResponseFlag::NoRouteFound => "NR",
            ResponseFlag::DelayInjected => "DI",
            ResponseFlag::FaultInjected => "FI",
            ResponseFlag::DownstreamConnectionTermination => "DC",
            ResponseFlag::UpstreamRetryLimitExceeded => "URX",
            ResponseFlag::DownstreamProtocolError => "DPE",
            ResponseFlag::UpstreamProtocolError => "UPE",
            ResponseFlag::NoClusterFound => "NC",
            ResponseFlag::RbacAccessDenied => "RBAC",
        }
    }

    const ALL: [ResponseFlag; 15] = [
        ResponseFlag::NoHealthyUpstream,
        ResponseFlag::UpstreamRequestTimeout,
        ResponseFlag::UpstreamRemoteReset,
        ResponseFlag::UpstreamConnectionFailure,
        ResponseFlag::UpstreamConnectionTermination,
        ResponseFlag::UpstreamOverflow,
        ResponseFlag::NoRouteFound,
        ResponseFlag::DelayInjected,
        ResponseFlag::FaultInjected,
        ResponseFlag::DownstreamConnectionTermination,
        ResponseFlag::UpstreamRetryLimitExceeded,
        ResponseFlag::DownstreamProtocolError,
        ResponseFlag::UpstreamProtocolError,
        ResponseFlag::NoClusterFound,
        ResponseFlag::RbacAccessDenied,
    ];
}

/// The flags of one request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ResponseFlags(u32);

impl ResponseFlags {
    pub fn insert(&mut self, flag: ResponseFlag) {
        self.0 |= 1 << flag as u8;
    }

    pub fn contains(self, flag: ResponseFlag) -> bool {
        self.0 & (1 << flag as u8) != 0
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
}

impl From<ResponseFlag> for ResponseFlags {
    fn from(flag: ResponseFlag) -> Self {
        let mut f = ResponseFlags::default();
        f.insert(flag);
        f
    }
}

/// `UT,URX` as Envoy's `%RESPONSE_FLAGS%` prints them; `-` when there are none.
impl fmt::Display for ResponseFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return f.write_str("-");
        }
        let mut first = true;
        for flag in ResponseFlag::ALL.into_iter().filter(|x| self.contains(*x)) {
            if !first {
                f.write_str(",")?;
            }
            f.write_str(flag.short())?;
            first = false;
        }
        Ok(())
    }
}

impl serde::Serialize for ResponseFlags {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_in_envoys_order_with_short_names() {
        let mut f = ResponseFlags::default();
        assert_eq!(f.to_string(), "-");
        f.insert(ResponseFlag::UpstreamRetryLimitExceeded);
        f.insert(ResponseFlag::UpstreamRequestTimeout);
        f.insert(ResponseFlag::UpstreamRetryLimitExceeded);
        assert_eq!(f.to_string(), "UT,URX");
        let mut g = ResponseFlags::from(ResponseFlag::FaultInjected);
        g.insert(ResponseFlag::DelayInjected);
        assert_eq!(g.to_string(), "DI,FI");
        assert_eq!(ResponseFlags::from(ResponseFlag::RbacAccessDenied).to_string(), "RBAC");
        assert_eq!(serde_json::to_string(&f).expect("json"), "\"UT,URX\"");
    }

    #[test]
    fn every_flag_has_its_own_bit_and_name() {
        let mut all = ResponseFlags::default();
        for flag in ResponseFlag::ALL {
            assert!(!all.contains(flag), "{flag:?} shares a bit");
            all.insert(flag);
        }
        let names: Vec<String> = all.to_string().split(',').map(str::to_string).collect();
        assert_eq!(names.len(), ResponseFlag::ALL.len());
        assert_eq!(names[0], "UH");
        assert_eq!(names.last().map(String::as_str), Some("RBAC"));
    }
}
