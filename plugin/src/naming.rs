//! Which service a call is for.

/// The gRPC service of a request path: `/demo.Echo/Say` → `demo.Echo`.
/// Anything that is not `/<service>/<method>` names no service.
pub fn service_from_grpc_path(path: &str) -> Option<&str> {
    let rest = path.strip_prefix('/')?;
    let (service, method) = rest.split_once('/')?;
    if service.is_empty() || method.is_empty() || method.contains(['/', '?']) {
        return None;
    }
    Some(service)
}

/// The host of an `:authority`, without its port: `user:10110` → `user`.
pub fn service_from_authority(authority: &str) -> Option<&str> {
    let host = match authority.rsplit_once(':') {
        // `[::1]:80` or `host:80`; a bare IPv6 literal has no port to strip.
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) && !host.ends_with(':') => {
            host
        }
        _ => authority,
    };
    (!host.is_empty()).then_some(host)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_the_service_of_grpc_paths() {
        assert_eq!(service_from_grpc_path("/demo.Echo/Say"), Some("demo.Echo"));
        assert_eq!(service_from_grpc_path("/User/GetUser"), Some("User"));
        for bad in [
            "",
            "/",
            "//Say",
            "/demo.Echo",
            "/demo.Echo/",
            "demo.Echo/Say",
            "/a/b/c",
            "/a/b?x=1",
        ] {
            assert_eq!(service_from_grpc_path(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn names_the_service_of_authorities() {
        assert_eq!(service_from_authority("user:10110"), Some("user"));
        assert_eq!(service_from_authority("user"), Some("user"));
        assert_eq!(service_from_authority("[::1]:80"), Some("[::1]"));
        assert_eq!(service_from_authority(""), None);
        assert_eq!(service_from_authority(":80"), None);
    }
}
