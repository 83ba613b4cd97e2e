//! Build script: links the x86-64 GNU/Linux binary with packed relative relocations (DT_RELR,
//! `-z pack-relative-relocs`) when the C library it is linked against can load them.
//!
//! A position-independent executable carries one relocation per pointer in its read-only-after-
//! relocation data (vtables, panic locations, `fmt` pieces): 24 bytes each as `.rela.dyn`, a few
//! bits each as `.relr.dyn`, about 46 KiB less on x86-64 (docs/embedded.md). glibc loads DT_RELR
//! from 2.36 on and says so with the symbol version `GLIBC_ABI_DT_RELR`, which the linker then
//! records as a need of the binary; so the option is given only for a native build whose C library
//! defines that version, and a binary built here still runs on the glibc it was built against.
//! `FERRYD_NO_RELR=1` leaves it out, for a binary meant for an older glibc than the build
//! machine's. GNU ld for the ARM targets (binutils 2.40) does not pack relocations, so ARM builds
//! are left alone.

use std::env;
use std::fs;

/// Where a native x86-64 glibc is installed (Debian's multiarch path first, then Red Hat's).
const LIBC_PATHS: &[&str] = &[
    "/lib/x86_64-linux-gnu/libc.so.6",
    "/usr/lib/x86_64-linux-gnu/libc.so.6",
    "/lib64/libc.so.6",
    "/usr/lib64/libc.so.6",
];

/// The version glibc defines when its loader applies DT_RELR.
const RELR_VERSION: &[u8] = b"GLIBC_ABI_DT_RELR";

fn main() {
    println!("cargo:rerun-if-changed=src/build.rs");
    println!("cargo:rerun-if-env-changed=FERRYD_NO_RELR");
    let var = |key: &str| env::var(key).unwrap_or_default();
    let x86_64_gnu_linux = var("CARGO_CFG_TARGET_ARCH") == "x86_64"
        && var("CARGO_CFG_TARGET_OS") == "linux"
        && var("CARGO_CFG_TARGET_ENV") == "gnu";
    let native = var("HOST") == var("TARGET");
    if !x86_64_gnu_linux || !native || env::var_os("FERRYD_NO_RELR").is_some() {
        return;
    }
    let mut loads_relr = false;
    for path in LIBC_PATHS {
        if let Ok(bytes) = fs::read(path) {
            println!("cargo:rerun-if-changed={path}");
            loads_relr = bytes.windows(RELR_VERSION.len()).any(|w| w == RELR_VERSION);
            break;
        }
    }
    if loads_relr {
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
}
