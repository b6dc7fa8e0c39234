//! Writes the JSON Schemas of the prober's output into `prober/schema/`
//! (or the directory given): `cargo run -p sluice-prober --bin sluice-prober-schema`.

use std::path::PathBuf;

fn main() -> std::io::Result<()> {
    let dir = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("schema"));
    for (name, schema) in sluice_prober::schema::output_schemas() {
        std::fs::write(dir.join(name), sluice_prober::schema::file_text(&schema))?;
    }
    Ok(())
}
