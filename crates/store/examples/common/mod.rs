//! What the store's examples share: a store of one view of 32 f64 features, and the first
//! event of an entity into it.
use std::sync::Arc;

use quiver_core::record::Record;
use quiver_core::value::Value;
use quiver_core::{Config, Schema};
use quiver_store::Store;

/// A one-partition store of view `v`: features `f0` … `f31`, all f64.
pub fn store_of_32_f64() -> Store {
    let features: Vec<String> = (0..32)
        .map(|i| format!("{{ name = \"f{i}\", type = \"f64\" }}"))
        .collect();
    let config = format!(
        "[[entity]]\nname = \"user\"\nkey = \"user_id\"\n[[view]]\nname = \"v\"\nentity = \"user\"\nfeatures = [{}]\n",
        features.join(", ")
    );
    let config = Config::from_toml_with_env(&config, Vec::new()).expect("config");
    Store::new(Arc::new(Schema::compile(&config).expect("schema")), 1)
}

/// The names of `v`'s features.
pub fn names() -> Vec<String> {
    (0..32).map(|f| format!("f{f}")).collect()
}

/// An event setting every feature of entity `key` (`i * 32 + f`).
pub fn whole_row<'a>(names: &'a [String], key: &'a str, i: usize) -> Record<'a> {
    let values = names
        .iter()
        .enumerate()
        .map(|(f, n)| (n.as_str(), Value::F64((i * 32 + f) as f64)))
        .collect();
    Record {
        ts_ms: 1_700_000_000_000,
        view: "v",
        key,
        event_id: None,
        dedup: None,
        values,
    }
}
