//! Prints the JSON Schema of `sluice.yaml`: `make schema` writes it to
//! docs/sluice.schema.json.

fn main() {
    print!("{}", sluice_core::config::schema_json());
}
