//! Records the git commit the crate is built from, or `unknown` outside a git checkout: the `git_commit` of
//! `whist_build_info`, and what `whist --version` prints (`whist_api::VERSION`).

use std::process::Command;

fn git(arguments: &[&str]) -> Option<String> {
    let output = Command::new("git").args(arguments).output().ok()?;
    if !output.status.success() {
        return None;
    }
    let text = String::from_utf8(output.stdout).ok()?;
    let text = text.trim();
    (!text.is_empty()).then(|| text.to_string())
}

fn main() {
    let commit = git(&["rev-parse", "HEAD"]).unwrap_or_else(|| "unknown".to_string());
    println!("cargo:rustc-env=WHIST_GIT_COMMIT={commit}");
    // Built again when HEAD moves (a checkout) or the branch it names does (a commit).
    println!("cargo:rerun-if-changed=build.rs");
    if let Some(file) = git(&["rev-parse", "--git-path", "HEAD"]) {
        println!("cargo:rerun-if-changed={file}");
    }
    if let Some(reference) = git(&["symbolic-ref", "-q", "HEAD"]) {
        if let Some(file) = git(&["rev-parse", "--git-path", &reference]) {
            println!("cargo:rerun-if-changed={file}");
        }
    }
}
