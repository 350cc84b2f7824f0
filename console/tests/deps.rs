//! The console runs in a browser: it must not pull in proxy-wasm (the
//! plugin's host ABI), only the wire format and the routing core.

use std::process::Command;

#[test]
fn depends_on_the_routing_core_and_not_on_proxy_wasm() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args([
            "tree",
            "--offline",
            "-p",
            "etcd-mesh-console",
            "-e",
            "normal",
            "--prefix",
            "none",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo tree runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tree = String::from_utf8_lossy(&out.stdout);
    assert!(tree.contains("etcd-mesh-routing"), "{tree}");
    assert!(tree.contains("etcd-mesh-wire"), "{tree}");
    assert!(
        !tree.contains("proxy-wasm"),
        "the console depends on proxy-wasm:\n{tree}"
    );
}
