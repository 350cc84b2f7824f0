//! Embeds the browser console's built files (console/dist/, made by
//! scripts/build-console.sh) into sync-server, so one binary serves /ui/.
//! When they are absent the list is empty and /ui/ says how to build them.

use std::error::Error;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

fn main() -> Result<(), Box<dyn Error>> {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let console = manifest.join("..").join("console");
    let dist = console.join("dist");
    let mut files = Vec::new();
    if dist.is_dir() {
        collect(&dist, &dist, &mut files)?;
        println!("cargo:rerun-if-changed={}", dist.display());
    } else {
        // Noticed when the build script creates console/dist/ in there.
        println!("cargo:rerun-if-changed={}", console.display());
    }
    files.sort();
    let mut code = String::from("pub static FILES: &[(&str, &[u8])] = &[\n");
    for (name, path) in &files {
        writeln!(
            code,
            "    ({name:?}, include_bytes!({:?})),",
            path.display().to_string()
        )?;
    }
    code.push_str("];\n");
    let out = PathBuf::from(std::env::var("OUT_DIR")?).join("ui_files.rs");
    std::fs::write(out, code)?;
    Ok(())
}

/// Every file under `dir`, named by its `/`-separated path below `root`.
fn collect(
    root: &Path,
    dir: &Path,
    files: &mut Vec<(String, PathBuf)>,
) -> Result<(), Box<dyn Error>> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            collect(root, &path, files)?;
        } else {
            let name = path
                .strip_prefix(root)?
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join("/");
            files.push((name, path.canonicalize()?));
        }
    }
    Ok(())
}
