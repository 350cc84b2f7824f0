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
}
