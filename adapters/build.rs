//! `sqlx::migrate!` embeds `migrations/` at compile time: rebuild this crate when a migration is added or changed,
//! so that a binary never ships without the migrations beside it.
fn main() {
    println!("cargo:rerun-if-changed=../migrations");
}
