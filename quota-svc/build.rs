//! `sqlx::migrate!` embeds the migrations at compile time: a new migration file must
//! rebuild the crate, which cargo does not know on its own.
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
