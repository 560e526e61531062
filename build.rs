//! Records the source commit (when built from a git checkout) for benchmark headers, and, for the
//! ROS node (feature `ros`), checks that the package's own interfaces are generated from the
//! current `msg/` files and lets the binaries find their libraries.
use std::path::{Path, PathBuf};
use std::process::Command;

const MESSAGES: [&str; 2] = ["ActionChunk", "PolicyStatus"];

fn main() {
    let commit = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".to_string());
    // A build from modified sources says so: benchmark figures name the code they measured.
    let dirty = Command::new("git")
        .args(["status", "--porcelain", "--untracked-files=no"])
        .output()
        .ok()
        .filter(|o| o.status.success() && !o.stdout.is_empty())
        .is_some();
    let suffix = if dirty { "-dirty" } else { "" };
    println!("cargo:rustc-env=BITVLA_GIT_COMMIT={commit}{suffix}");
    // The sources too, so that the dirty mark follows edits (running git costs milliseconds).
    for path in [
        ".git/HEAD",
        ".git/index",
        ".git/refs/heads",
        ".git/packed-refs",
        "src",
        "Cargo.toml",
    ] {
        if Path::new(path).exists() {
            println!("cargo:rerun-if-changed={path}");
        }
    }
    println!("cargo:rerun-if-changed=build.rs");
    for name in MESSAGES {
        println!("cargo:rerun-if-changed=msg/{name}.msg");
    }
    if std::env::var_os("CARGO_FEATURE_ROS").is_some() {
        check_interfaces();
    }
}

/// r2r binds the interfaces installed in an `AMENT_PREFIX_PATH` prefix (the package's CMake build
/// generates them from `msg/`). A `.msg` changed since then would give the node types that differ
/// from what the replay writes into bags and from the definitions shipped in `msg/`: fail here,
/// at build time, saying what to rebuild.
fn check_interfaces() {
    println!("cargo:rerun-if-env-changed=AMENT_PREFIX_PATH");
    let prefixes = std::env::var("AMENT_PREFIX_PATH").unwrap_or_default();
    let prefix: Option<PathBuf> = prefixes
        .split(':')
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .find(|p| {
            p.join("share/ament_index/resource_index/rosidl_interfaces/bitvla_ros")
                .exists()
        });
    let Some(prefix) = prefix else {
        panic!(
            "\n\nbitvla_node needs the package's own interfaces (msg/ActionChunk.msg, \
             msg/PolicyStatus.msg) generated and installed in a prefix on AMENT_PREFIX_PATH, and \
             none has them.\nWith the project's ROS wheels: run scripts/setup_ros.sh, then \
             `. .ros/env`. With colcon: `colcon build` builds them before the node.\n\n"
        );
    };
    for name in MESSAGES {
        let source = Path::new("msg").join(format!("{name}.msg"));
        let installed = prefix.join(format!("share/bitvla_ros/msg/{name}.msg"));
        println!("cargo:rerun-if-changed={}", installed.display());
        let read = |p: &Path| std::fs::read_to_string(p).ok();
        if read(&source) != read(&installed) {
            panic!(
                "\n\n{} differs from the interface generated from it in {} (built from an older \
                 msg/): rebuild the interfaces (scripts/setup_ros.sh, or colcon build) before \
                 building the node.\n\n",
                source.display(),
                installed.display()
            );
        }
    }
    // The generated type-support libraries live in the prefix's lib/: let the binaries find them
    // without LD_LIBRARY_PATH.
    println!(
        "cargo:rustc-link-arg-bins=-Wl,-rpath,{}",
        prefix.join("lib").display()
    );
}
