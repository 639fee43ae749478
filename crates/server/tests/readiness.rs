//! `/readyz` is only true once recovery is complete: a node that says it is ready serves every
//! row the log holds.

use quiver_core::Config;
use quiver_server::Node;

#[test]
fn ready_implies_every_row_recovered() {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        r#"
[server]
data_dir = "{}"
[log]
partitions = 2
[[entity]]
name = "user"
key = "user_id"
[[view]]
name = "v"
entity = "user"
features = [{{ name = "x", type = "i64" }}]
"#,
        dir.path().display()
    );
    let config = Config::from_toml_with_env(&text, Vec::new()).unwrap();
    const ROWS: usize = 60_000;
    {
        // Write the log, then "crash": no snapshot (interval 60 s), so restart must replay.
        let node = Node::open(config.clone()).unwrap();
        let schema = node.schema.clone();
        let body: Vec<String> = (0..ROWS)
            .map(|i| format!(r#"{{"view":"v","key":"k{i}","values":{{"x":{i}}}}}"#))
            .collect();
        for chunk in body.chunks(10_000) {
            let events = quiver_core::event::decode_batch(
                chunk.join("\n").as_bytes(),
                &schema,
                &node.limits,
                0,
            )
            .unwrap();
            let mut batches: Vec<quiver_log::RecordBatch> =
                vec![Default::default(), Default::default()];
            for e in &events {
                let p = quiver_core::partition::partition_for(e.key.as_bytes(), 2);
                batches[p as usize].push_with(|b| quiver_core::record::encode(&schema, e, None, b));
            }
            let batches = batches
                .into_iter()
                .enumerate()
                .map(|(p, b)| (p as u32, b))
                .collect();
            for a in node.log.append(batches, quiver_log::Ack::Durable).unwrap() {
                a.wait_blocking().unwrap();
            }
        }
        node.shutdown();
    }
    // As if the process had died before any snapshot: restart must replay the whole log.
    std::fs::remove_dir_all(dir.path().join("snapshots")).unwrap();
    let node = Node::open(config).unwrap();
    let mut saw_not_ready = false;
    loop {
        match node.not_ready_reason() {
            Some(reason) => {
                assert!(reason.contains("recovering"), "{reason}");
                saw_not_ready = true;
            }
            None => {
                assert_eq!(
                    node.store.rows(),
                    ROWS,
                    "ready before every row was replayed"
                );
                break;
            }
        }
        std::thread::sleep(std::time::Duration::from_micros(200));
    }
    // Not asserted (timing-dependent), only reported: whether the 503 window was observed.
    eprintln!("observed the not-ready window: {saw_not_ready}");
}
