use std::path::{Path, PathBuf};

use super::*;

const MINIMAL: &str = r#"
    [model]
    dir = "models/clip"
    [source]
    kind = "files"
    manifest = "events.jsonl"
    [sink.parquet]
    dir = "${OUT_DIR:-out}"
"#;

fn parse(text: &str) -> Result<PipelineConfig, Vec<Problem>> {
    PipelineConfig::from_toml(text, Path::new("/base"), |k| {
        (k == "SET").then(|| "v".to_string())
    })
}

#[test]
fn minimal_config_gets_defaults_and_absolute_paths() {
    let c = parse(MINIMAL).expect("valid");
    assert_eq!(c.model.dir, PathBuf::from("/base/models/clip"));
    assert_eq!(c.sink.parquet.dir, Some(PathBuf::from("/base/out")));
    assert_eq!(c.engine.vision_batch.max_size, 32);
    assert_eq!(
        c.dead_letter_path(),
        Some(PathBuf::from("/base/out/_dead_letters.jsonl"))
    );
}

#[test]
fn review_thresholds_need_labels_and_a_place_for_what_they_route() {
    let with = |model: &str, sink: &str| {
        parse(&format!(
            "[model]\ndir = \"m\"\n{model}\n[source]\nkind = \"files\"\nmanifest = \"e.jsonl\"\n{sink}"
        ))
    };
    let local = "[sink.parquet]\ndir = \"out\"";
    let c = with("labels = \"l.toml\"\nreview_min_score = 0.8", local).expect("valid");
    assert_eq!(
        c.review_path(),
        Some(PathBuf::from("/base/out/_review.jsonl"))
    );
    assert!(c.review().active());
    let problems = |r: Result<PipelineConfig, Vec<Problem>>| {
        r.expect_err("invalid")
            .iter()
            .map(|p| format!("{}: {}", p.path, p.message))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let e = problems(with("review_min_score = 0.8", local));
    assert!(
        e.contains("model.review_min_score: review routing needs labels"),
        "{e}"
    );
    let e = problems(with("labels = \"l.toml\"\nreview_min_margin = 1.5", local));
    assert!(
        e.contains("model.review_min_margin: must be between 0 and 1"),
        "{e}"
    );
    let s3 = "[dead_letter]\ntopic = \"d\"\n[sink.parquet]\nurl = \"s3://b/p/\"\n[sink.kafka]\nbrokers = \"k:9092\"\nembeddings_topic = \"e\"";
    let e = problems(with("labels = \"l.toml\"\nreview_min_score = 0.8", s3));
    assert!(
        e.contains("sink.kafka.review_topic: records routed to review need a place"),
        "{e}"
    );
    let c = with(
        "labels = \"l.toml\"\nreview_min_score = 0.8",
        &format!("{s3}\nreview_topic = \"r\""),
    )
    .expect("valid");
    assert_eq!(c.review_path(), None);
    let e = problems(with(
        "labels = \"l.toml\"",
        &format!("{s3}\nreview_topic = \"r\""),
    ));
    assert!(e.contains("nothing is routed to it"), "{e}");
}

#[test]
fn relative_paths_are_normalised() {
    assert_eq!(
        normalize(Path::new("pipelines/../out/local")),
        PathBuf::from("out/local")
    );
    assert_eq!(normalize(Path::new("../a/./b")), PathBuf::from("../a/b"));
    assert_eq!(normalize(Path::new("/x/y/../../z")), PathBuf::from("/z"));
    // A path that cancels out is the current directory, not an empty
    // path (which no system call accepts): `root = ".."` next to a
    // pipeline in `pipelines/`.
    assert_eq!(normalize(Path::new("pipelines/..")), PathBuf::from("."));
    assert_eq!(normalize(Path::new("./.")), PathBuf::from("."));
}

#[test]
fn unknown_fields_are_rejected_with_a_line() {
    let text = format!("{MINIMAL}\n[engine]\nmax_in_flite = 3\n");
    let p = parse(&text).expect_err("typo");
    assert_eq!(p.len(), 1);
    assert!(p[0].message.contains("max_in_flite"), "{p:?}");
    assert!(p[0].path.starts_with("line "), "{p:?}");
}

#[test]
fn every_problem_is_listed() {
    let text = format!(
        "{MINIMAL}\n[engine]\nmax_in_flight = 4\nvision_batch = {{ max_size = 0, max_wait_ms = 1 }}\ntext_batch = {{ max_size = 9, max_wait_ms = 1 }}\n[fetch]\nconcurrency = 0\n[shutdown]\ndrain_deadline_secs = 1e300\n[sink.kafka]\nbrokers = \"b:9092\"\nembeddings_topic = \" \"\n"
    );
    let p = parse(&text).expect_err("invalid");
    let paths: Vec<&str> = p.iter().map(|p| p.path.as_str()).collect();
    assert_eq!(
        paths,
        vec![
            "fetch.concurrency",
            "engine.vision_batch.max_size",
            "engine.text_batch.max_size",
            "sink.kafka.embeddings_topic",
            "shutdown.drain_deadline_secs",
        ],
        "{p:?}"
    );
}

const KAFKA: &str = r#"
    [model]
    dir = "m"
    [source]
    kind = "kafka"
    brokers = "127.0.0.1:9092"
    topics = ["events"]
    group_id = "g"
    [source.options]
    "fetch.min.bytes" = "1"
    [fetch]
    allowed_schemes = ["s3"]
    allowed_buckets = ["images"]
    [sink.parquet]
    url = "s3://out/embeddings/"
    [sink.kafka]
    embeddings_topic = "emb"
    [dead_letter]
    topic = "dlq"
"#;

#[test]
fn kafka_pipeline_parses() {
    let c = parse(KAFKA).expect("valid");
    let SourceConfig::Kafka(k) = &c.source else {
        panic!("kafka source expected");
    };
    assert_eq!(k.options["fetch.min.bytes"], "1");
    assert_eq!(c.kafka_sink_brokers().as_deref(), Some("127.0.0.1:9092"));
    assert_eq!(c.dead_letter_path(), None);
    assert_eq!(
        parse_s3_url(c.sink.parquet.url.as_deref().unwrap_or_default()),
        Ok(("out".into(), "embeddings".into()))
    );
}

#[test]
fn kafka_pipelines_refuse_unsafe_settings() {
    let text = KAFKA
        .replace(
            "allowed_schemes = [\"s3\"]",
            "allowed_schemes = [\"s3\", \"file\"]",
        )
        .replace("allowed_buckets = [\"images\"]", "")
        .replace(
            "group_id = \"g\"",
            "group_id = \"g\"\ndrain_deadline_ms = 50000",
        )
        .replace("topic = \"dlq\"", "");
    let p = parse(&text).expect_err("invalid");
    let paths: Vec<&str> = p.iter().map(|p| p.path.as_str()).collect();
    assert_eq!(
        paths,
        vec![
            "source.drain_deadline_ms",
            "fetch.allowed_buckets",
            "dead_letter",
            "fetch.allowed_schemes",
        ],
        "{p:?}"
    );
}

/// Closed sets are enums: a value outside one is refused where it is
/// written, naming the values that are allowed.
#[test]
fn closed_sets_are_refused_with_their_line() {
    for (text, value, allowed) in [
        (
            format!("{MINIMAL}\n[fetch]\nallowed_schemes = [\"file\", \"http\"]\n"),
            "http",
            "`file` or `s3`",
        ),
        (
            KAFKA.replace(
                "group_id = \"g\"",
                "group_id = \"g\"\nauto_offset_reset = \"smallest\"",
            ),
            "smallest",
            "`earliest` or `latest`",
        ),
        (
            format!("{MINIMAL}\n[image]\nmode = \"quick\"\n"),
            "quick",
            "`exact` or `fast`",
        ),
    ] {
        let p = parse(&text).expect_err(value);
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].path.starts_with("line "), "{p:?}");
        assert!(
            p[0].message.contains(value) && p[0].message.contains(allowed),
            "{p:?}"
        );
    }
}

/// The typed views of "exactly one of" pairs are the same rule validation
/// reports.
#[test]
fn exactly_one_of_pairs_have_one_rule() {
    let c = parse(MINIMAL).expect("valid");
    let SourceConfig::Files(f) = &c.source else {
        panic!("files source expected");
    };
    assert_eq!(
        f.input(),
        Ok(FilesInput::Manifest(PathBuf::from("/base/events.jsonl")))
    );
    assert_eq!(
        c.sink.parquet.output(),
        Ok(ParquetOutput::Dir(PathBuf::from("/base/out")))
    );
    assert_eq!(
        c.dead_letters(),
        Some(DeadLetters::File(PathBuf::from(
            "/base/out/_dead_letters.jsonl"
        )))
    );
    let both = MINIMAL.replace(
        "manifest = \"events.jsonl\"",
        "manifest = \"events.jsonl\"\ndir = \"images\"",
    );
    let p = parse(&both).expect_err("both");
    assert_eq!(p[0].path, "source");
    assert!(p[0].message.contains("not both"), "{p:?}");
    // Both outputs: that one problem, and none made up from it.
    let both = format!("{MINIMAL}url = \"s3://b/p/\"\n");
    let p = parse(&both).expect_err("both");
    let paths: Vec<&str> = p.iter().map(|p| p.path.as_str()).collect();
    assert_eq!(paths, vec!["sink.parquet"], "{p:?}");
    let c = parse(KAFKA).expect("valid");
    assert_eq!(
        c.sink.parquet.output(),
        Ok(ParquetOutput::S3 {
            bucket: "out".into(),
            prefix: "embeddings".into()
        })
    );
    assert_eq!(c.dead_letters(), Some(DeadLetters::Topic("dlq".into())));
}

#[test]
fn environment_is_interpolated() {
    assert_eq!(
        interpolate("a=${SET} b=${UNSET:-d}", |k| (k == "SET")
            .then(|| "v".into())),
        Ok("a=v b=d".into())
    );
    let p = interpolate("x\ny=${NOPE}", |_| None).expect_err("unset");
    assert_eq!(p[0].path, "line 2");
    assert!(p[0].message.contains("NOPE"));
}
