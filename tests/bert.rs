//! Tests of the example server's BERT module: the built-in model, batching by
//! length, admission, and, when `CANDLEWICK_MINILM_DIR` names a local copy of
//! all-MiniLM-L6-v2, the real model.

#[path = "../examples/serve/bert.rs"]
#[allow(dead_code)]
mod bert;

use bert::{BertLoader, EncodeError, LoadError, normalize};
use candle_core::Device;
use candlewick::{BoxError, Loader, Model, Serving, ServingConfig};

/// Texts from one to a few dozen tokens.
const TEXTS: [&str; 6] = [
    "Hello world, this is a test.",
    "",
    "cat",
    "The quick brown fox jumps over the lazy dog while the farmer watches from the old red \
     house near the river, thinking about the long winter and the many things still to do.",
    "A man is playing a guitar.",
    "Someone is playing an instrument, and the music fills the room.",
];

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (norm(a) * norm(b))
}

fn encode_all(loader: &BertLoader, texts: &[&str]) -> Vec<Vec<u32>> {
    let encoder = loader.encoder();
    texts
        .iter()
        .map(|text| encoder.encode(text, None).expect("encodes"))
        .collect()
}

/// Checks that a mixed-length batch, in shuffled order with a duplicate, gives
/// each input the embedding it gets alone.
fn assert_batch_matches_singles(model: &impl Model<Vec<u32>, Output = Vec<f32>>, ids: &[Vec<u32>]) {
    let mut batch: Vec<Vec<u32>> = ids.iter().rev().cloned().collect();
    batch.push(ids[0].clone());
    let batched = model.forward(&batch).expect("batch forward");
    assert_eq!(batched.len(), batch.len());
    for (input, output) in batch.iter().zip(&batched) {
        let alone = model.forward(std::slice::from_ref(input)).expect("forward");
        let diff = max_abs_diff(&alone[0], output);
        assert!(
            diff < 1e-4,
            "{} tokens: batched differs by {diff}",
            input.len()
        );
    }
}

#[tokio::test]
async fn the_builtin_model_is_deterministic() -> Result<(), BoxError> {
    let loader = BertLoader::builtin(7);
    assert_eq!(loader.dimension(), 128);
    assert!(loader.wants_normalization());

    let ids = loader.encoder().encode(TEXTS[0], None)?;
    // [CLS] hello world , this is a test . [SEP]: whole words, no [UNK].
    assert_eq!(ids.len(), 10);
    assert!(!ids.contains(&1), "{ids:?}");
    assert_eq!(
        BertLoader::builtin(7).encoder().encode(TEXTS[0], None)?,
        ids
    );

    let one = std::slice::from_ref(&ids);
    let first = loader.load(&Device::Cpu).await?.forward(one)?;
    let again = BertLoader::builtin(7)
        .load(&Device::Cpu)
        .await?
        .forward(one)?;
    let other = BertLoader::builtin(8)
        .load(&Device::Cpu)
        .await?
        .forward(one)?;
    assert_eq!(first[0].len(), 128);
    assert!(first[0].iter().all(|x| x.is_finite()));
    assert_eq!(first, again);
    assert_ne!(first, other);
    Ok(())
}

#[tokio::test]
async fn a_mixed_batch_matches_each_input_alone() -> Result<(), BoxError> {
    let loader = BertLoader::builtin(1);
    let model = loader.load(&Device::Cpu).await?;
    assert_batch_matches_singles(&model, &encode_all(&loader, &TEXTS));
    assert!(model.forward(&[])?.is_empty());
    assert!(!model.warmup_inputs().is_empty());
    Ok(())
}

#[tokio::test]
async fn admission_rejects_empty_too_long_and_unknown_inputs() {
    let loader = BertLoader::builtin(1);
    let max = loader.max_tokens();
    assert_eq!(loader.cost(&vec![2, 5, 3]), 3);
    assert!(loader.validate(&vec![2, 5, 3]).is_ok());
    assert!(loader.validate(&vec![2; max]).is_ok());

    let error = |input: Vec<u32>| {
        let error = loader.validate(&input).expect_err("rejected");
        error.downcast_ref::<EncodeError>().expect("typed").clone()
    };
    assert_eq!(error(vec![]), EncodeError::Empty);
    assert_eq!(
        error(vec![2; max + 1]),
        EncodeError::TooLong {
            tokens: max + 1,
            max
        }
    );
    assert!(matches!(
        error(vec![2, u32::MAX, 3]),
        EncodeError::UnknownId { id: u32::MAX, .. }
    ));
}

#[test]
fn the_encoder_refuses_or_truncates_long_texts() {
    let encoder = BertLoader::builtin(1).encoder();
    let max = encoder.max_tokens();
    let long = "word ".repeat(max);
    match encoder.encode(&long, None) {
        Err(EncodeError::TooLong { tokens, max: m }) => {
            assert_eq!((tokens, m), (max + 2, max));
        }
        other => panic!("expected TooLong, got {other:?}"),
    }
    let ids = encoder
        .encode(&long, Some(bert::Direction::Right))
        .expect("truncates");
    assert_eq!(ids.len(), max);
    // [CLS] first, [SEP] kept last.
    assert_eq!((ids[0], ids[max - 1]), (2, 3));
}

#[tokio::test]
async fn serving_the_builtin_model_matches_the_model() -> Result<(), BoxError> {
    let loader = BertLoader::builtin(3);
    let ids = encode_all(&loader, &TEXTS);
    let expected = loader.load(&Device::Cpu).await?.forward(&ids)?;

    let serving: Serving<Vec<u32>, Vec<f32>> = Serving::start(loader, ServingConfig::default())?;
    let tasks: Vec<_> = ids
        .into_iter()
        .map(|input| {
            let serving = serving.clone();
            tokio::spawn(async move { serving.infer(input).await })
        })
        .collect();
    for (task, expected) in tasks.into_iter().zip(&expected) {
        let got = task.await??;
        assert!(max_abs_diff(&got, expected) < 1e-4);
    }
    assert!(serving.infer(Vec::new()).await.is_err());
    Ok(())
}

/// Skips a test whose external part is missing, unless CI requires it
/// (`CANDLEWICK_REQUIRE_ALL`, set by `.ci/run`).
fn skip(why: &str) {
    assert!(
        std::env::var_os("CANDLEWICK_REQUIRE_ALL").is_none(),
        "required but {why}"
    );
    eprintln!("skipped: {why}");
}

/// The real all-MiniLM-L6-v2, from the directory in `CANDLEWICK_MINILM_DIR`.
#[tokio::test]
async fn minilm_ranks_a_paraphrase_above_an_unrelated_sentence() -> Result<(), BoxError> {
    let Some(dir) = std::env::var_os("CANDLEWICK_MINILM_DIR") else {
        skip("CANDLEWICK_MINILM_DIR is not set to an all-MiniLM-L6-v2 directory");
        return Ok(());
    };
    if !std::path::Path::new(&dir).is_dir() {
        skip(&format!("CANDLEWICK_MINILM_DIR={dir:?} is not a directory"));
        return Ok(());
    }
    let loader = BertLoader::from_dir(&dir)?;
    assert_eq!(loader.dimension(), 384);
    assert!(loader.wants_normalization());
    assert_eq!(loader.pooling(), bert::Pooling::Mean);
    assert_eq!(loader.max_tokens(), 256);

    let texts = [
        "A man is playing a guitar.",
        "Someone is playing an instrument.",
        "The stock market fell sharply today.",
    ];
    let ids = encode_all(&loader, &texts);
    // The shipped tokenizer pads to 128; ours must not.
    assert!(ids.iter().all(|ids| ids.len() < 16), "{ids:?}");

    let model = loader.load(&Device::Cpu).await?;
    let mut embeddings = model.forward(&ids)?;
    for embedding in &mut embeddings {
        assert_eq!(embedding.len(), 384);
        normalize(embedding);
        let norm = embedding.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5, "norm {norm}");
    }
    let paraphrase = cosine(&embeddings[0], &embeddings[1]);
    let unrelated = cosine(&embeddings[0], &embeddings[2]);
    eprintln!("cosine: paraphrase {paraphrase:.4}, unrelated {unrelated:.4}");
    assert!(paraphrase > unrelated + 0.2, "{paraphrase} vs {unrelated}");

    assert_batch_matches_singles(&model, &encode_all(&loader, &TEXTS));
    Ok(())
}

#[test]
fn a_model_directory_without_its_files_is_a_clear_error() {
    let dir = std::env::temp_dir().join(format!("candlewick-bert-{}", std::process::id()));
    let missing = |dir: &std::path::Path| match BertLoader::from_dir(dir) {
        Err(error @ LoadError::Missing { .. }) => error.to_string(),
        other => panic!("expected Missing, got {other:?}"),
    };
    assert!(missing(&dir).contains("the model directory"));

    std::fs::create_dir_all(&dir).expect("temp dir");
    assert!(missing(&dir).contains("config.json"));
    let config = r#"{"vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 1,
        "num_attention_heads": 2, "intermediate_size": 16, "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1, "max_position_embeddings": 32, "type_vocab_size": 2,
        "initializer_range": 0.02, "layer_norm_eps": 1e-12, "pad_token_id": 0}"#;
    std::fs::write(dir.join("config.json"), config).expect("write");
    assert!(missing(&dir).contains("model.safetensors"));
    std::fs::remove_dir_all(&dir).expect("clean up");
}
