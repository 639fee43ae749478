//! Ingest bodies: any bytes must decode to events or to an error naming the problem — never a
//! panic, and every accepted event must fit its schema and survive the record codec.
#![no_main]

use libfuzzer_sys::fuzz_target;
use quiver_core::event::{decode_batch, EventLimits};
use quiver_core::{record, Config, Schema};

const CONFIG: &str = r#"
[[entity]]
name = "user"
key = "user_id"
[[view]]
name = "txn"
entity = "user"
features = [
  { name = "amount", type = "f64" }, { name = "n", type = "i64" }, { name = "b", type = "bool" },
  { name = "s", type = "string" }, { name = "e", type = "f32[3]" },
]
"#;

const LIMITS: EventLimits = EventLimits { batch_events_max: 64, key_bytes_max: 64, event_id_bytes_max: 64, string_bytes_max: 256 };

static SCHEMA: std::sync::LazyLock<Schema> =
    std::sync::LazyLock::new(|| Schema::compile(&Config::from_toml_with_env(CONFIG, Vec::new()).unwrap()).unwrap());

fuzz_target!(|body: &[u8]| {
    let schema = &*SCHEMA;
    if let Ok(events) = decode_batch(body, schema, &LIMITS, 0) {
        for e in &events {
            let view = schema.view(e.view);
            for (f, v) in &e.values {
                assert!(v.fits(view.feature(*f).ty));
            }
            let mut buf = Vec::new();
            record::encode(schema, e, None, &mut buf);
            let rec = record::decode(&buf).expect("what ingest accepts, the log can decode");
            assert_eq!(rec.key, e.key);
        }
    }
});
