//! BERT sentence embeddings for the example server: a built-in model that needs
//! no download, or any local Hugging Face BERT-family sentence-embedding
//! directory, behind candlewick's [`Loader`] and [`Model`] traits.
//!
//! The server tokenizes in its handler with a [`TextEncoder`], sends the token
//! ids through `Serving<Vec<u32>, Vec<f32>>`, and applies [`normalize`] when the
//! request (or [`BertLoader::wants_normalization`]) asks for it.

use std::collections::HashMap;
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, IndexOp, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config, HiddenAct};
use candlewick::collate::pad_sequences;
use candlewick::error::Unrecoverable;
use candlewick::{BoxError, LoadOnce, Loader, Model};
use tokenizers::Tokenizer;
use tokenizers::models::wordpiece::WordPiece;
use tokenizers::normalizers::BertNormalizer;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::processors::template::TemplateProcessing;

/// A sub-batch grows while its padded tokens stay within this ratio of its
/// real tokens, as tenths: 13 is 1.3×.
const MAX_PADDING_TENTHS: usize = 13;

/// How token vectors become one sentence vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pooling {
    /// The mean of the real (unpadded) tokens.
    Mean,
    /// The vector of the first token, `[CLS]`.
    Cls,
}

impl Pooling {
    /// The name sentence-transformers gives it.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Mean => "mean",
            Self::Cls => "cls",
        }
    }
}

/// Why a text or a token sequence is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum EncodeError {
    /// An empty token sequence.
    Empty,
    /// More tokens than the model takes; the server answers 413.
    TooLong {
        /// The tokens of the input.
        tokens: usize,
        /// The most the model takes.
        max: usize,
    },
    /// A token id outside the vocabulary.
    UnknownId {
        /// The id.
        id: u32,
        /// The size of the vocabulary.
        vocab_size: usize,
    },
    /// The tokenizer failed.
    Tokenizer(String),
}

impl fmt::Display for EncodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Empty => f.write_str("the input has no tokens"),
            Self::TooLong { tokens, max } => write!(
                f,
                "the input has {tokens} tokens, more than the model's maximum of {max}; \
                 shorten it or ask for truncation"
            ),
            Self::UnknownId { id, vocab_size } => write!(
                f,
                "token id {id} is outside the vocabulary of {vocab_size} tokens"
            ),
            Self::Tokenizer(message) => write!(f, "tokenizer error: {message}"),
        }
    }
}

impl std::error::Error for EncodeError {}

/// Why a model directory cannot be used.
#[derive(Debug)]
pub(crate) enum LoadError {
    /// A required file is not there.
    Missing {
        /// The file.
        path: PathBuf,
        /// What the file is and how to get it.
        hint: &'static str,
    },
    /// A file is there but cannot be read or understood.
    Invalid {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Missing { path, hint } => write!(f, "missing {}: {hint}", path.display()),
            Self::Invalid { path, reason } => write!(f, "cannot use {}: {reason}", path.display()),
        }
    }
}

impl std::error::Error for LoadError {}

/// Turns text into the token ids the model takes. Cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct TextEncoder {
    tokenizer: Arc<Tokenizer>,
    max_tokens: usize,
    /// Named prompts from `config_sentence_transformers.json`.
    prompts: Arc<HashMap<String, String>>,
}

/// Which end of a too-long input truncation cuts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
pub(crate) enum Direction {
    /// Keep the start (the default).
    #[default]
    #[serde(alias = "right", alias = "RIGHT")]
    Right,
    /// Keep the end.
    #[serde(alias = "left", alias = "LEFT")]
    Left,
}

impl Direction {
    /// `ids` cut to at most `max`, from this end.
    pub(crate) fn cut(self, mut ids: Vec<u32>, max: usize) -> Vec<u32> {
        match self {
            Self::Right => ids.truncate(max),
            Self::Left => {
                ids.drain(..ids.len().saturating_sub(max));
            }
        }
        ids
    }
}

/// One token of a tokenized text, as `/tokenize` reports it.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct Token {
    pub(crate) id: u32,
    pub(crate) text: String,
    pub(crate) special: bool,
    pub(crate) start: Option<usize>,
    pub(crate) stop: Option<usize>,
}

impl TextEncoder {
    /// The token ids of `text`, with the model's special tokens.
    ///
    /// A text of more than [`max_tokens`](Self::max_tokens) tokens is an
    /// [`EncodeError::TooLong`] unless `truncate` names the end to cut,
    /// keeping the first (`[CLS]`) and last (`[SEP]`) special tokens.
    pub(crate) fn encode(
        &self,
        text: &str,
        truncate: Option<Direction>,
    ) -> Result<Vec<u32>, EncodeError> {
        let encoding = self
            .tokenizer
            .encode_fast(text, true)
            .map_err(|error| EncodeError::Tokenizer(error.to_string()))?;
        let ids = encoding.get_ids();
        if ids.len() <= self.max_tokens {
            return Ok(ids.to_vec());
        }
        let Some(direction) = truncate else {
            return Err(EncodeError::TooLong {
                tokens: ids.len(),
                max: self.max_tokens,
            });
        };
        let (first, last) = (ids[0], ids[ids.len() - 1]);
        let body = &ids[1..ids.len() - 1];
        let keep = self.max_tokens.saturating_sub(2);
        let kept = match direction {
            Direction::Right => &body[..keep],
            Direction::Left => &body[body.len() - keep..],
        };
        let mut out = Vec::with_capacity(self.max_tokens);
        out.push(first);
        out.extend_from_slice(kept);
        out.push(last);
        Ok(out)
    }

    /// The tokens of `text`, as TEI reports them: byte spans in `text`, and
    /// the text of the span (the token's own text for special tokens).
    pub(crate) fn tokenize(
        &self,
        text: &str,
        special_tokens: bool,
    ) -> Result<Vec<Token>, EncodeError> {
        let encoding = self
            .tokenizer
            .encode(text, special_tokens)
            .map_err(|error| EncodeError::Tokenizer(error.to_string()))?;
        Ok(encoding
            .get_ids()
            .iter()
            .zip(encoding.get_tokens())
            .zip(encoding.get_special_tokens_mask())
            .zip(encoding.get_offsets())
            .map(|(((&id, token), &special), &(start, stop))| {
                let special = special == 1;
                let span = (!special).then(|| text.get(start..stop)).flatten();
                Token {
                    id,
                    text: span.map_or_else(|| token.clone(), str::to_owned),
                    special,
                    start: (!special).then_some(start),
                    stop: (!special).then_some(stop),
                }
            })
            .collect())
    }

    /// Like [`encode`](Self::encode) with `prompt` before `text`; a cut
    /// from the left never cuts into the prompt.
    pub(crate) fn encode_prompted(
        &self,
        prompt: Option<&str>,
        text: &str,
        truncate: Option<Direction>,
    ) -> Result<Vec<u32>, EncodeError> {
        let Some(prompt) = prompt else {
            return self.encode(text, truncate);
        };
        let prompted = format!("{prompt}{text}");
        if truncate != Some(Direction::Left) {
            return self.encode(&prompted, truncate);
        }
        let ids = self.ids(&prompted, true)?;
        if ids.len() <= self.max_tokens {
            return Ok(ids);
        }
        // [CLS] prompt… text… [SEP]: keep the prompt, cut the text's start.
        let prompt_len = self.ids(prompt, false)?.len().min(ids.len() - 2);
        let (head, rest) = ids[1..ids.len() - 1].split_at(prompt_len);
        let keep = self.max_tokens.saturating_sub(2 + head.len());
        let mut out = Vec::with_capacity(self.max_tokens);
        out.push(ids[0]);
        out.extend_from_slice(head);
        out.extend_from_slice(&rest[rest.len().saturating_sub(keep)..]);
        out.push(ids[ids.len() - 1]);
        Ok(out)
    }

    fn ids(&self, text: &str, special_tokens: bool) -> Result<Vec<u32>, EncodeError> {
        self.tokenizer
            .encode_fast(text, special_tokens)
            .map(|encoding| encoding.get_ids().to_vec())
            .map_err(|error| EncodeError::Tokenizer(error.to_string()))
    }

    /// The text of the prompt called `name`, if the model defines it.
    pub(crate) fn prompt(&self, name: &str) -> Option<&str> {
        self.prompts.get(name).map(String::as_str)
    }

    /// The names of the model's prompts.
    pub(crate) fn prompt_names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.prompts.keys().map(String::as_str).collect();
        names.sort_unstable();
        names
    }

    /// The most tokens one input may have, special tokens included.
    pub(crate) fn max_tokens(&self) -> usize {
        self.max_tokens
    }
}

/// Where the weights come from.
#[derive(Debug)]
enum Weights {
    Builtin { seed: u64 },
    File(PathBuf),
}

#[derive(Debug)]
struct Inner {
    weights: Weights,
    /// The weights in host memory, read once for every replica: CPU replicas
    /// build their models on this one copy (candle tensors share storage).
    host_weights: LoadOnce<HashMap<String, Tensor>>,
    config: Config,
    pooling: Pooling,
    normalize: bool,
    name: String,
    encoder: TextEncoder,
}

/// Builds a [`BertEmbedder`] on each replica's device. Cheap to clone.
///
/// Reads the configuration and tokenizer once; each [`load`](Loader::load)
/// builds the weights on its device. Admission costs one per token.
#[derive(Debug, Clone)]
pub(crate) struct BertLoader(Arc<Inner>);

impl BertLoader {
    /// A small BERT (128 dimensions, 2 layers) with weights drawn from `seed`
    /// and a built-in WordPiece vocabulary: no download, the same ids and
    /// embeddings on every run, but no meaning in the vectors.
    pub(crate) fn builtin(seed: u64) -> Self {
        let vocab = builtin_vocab();
        let config = Config {
            vocab_size: vocab.len(),
            hidden_size: 128,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            intermediate_size: 512,
            hidden_act: HiddenAct::Gelu,
            max_position_embeddings: 512,
            layer_norm_eps: 1e-12,
            pad_token_id: 0,
            ..Config::default()
        };
        let tokenizer = builtin_tokenizer(&vocab).expect("the built-in vocabulary is valid");
        Self(Arc::new(Inner {
            weights: Weights::Builtin { seed },
            host_weights: LoadOnce::new(),
            pooling: Pooling::Mean,
            normalize: true,
            name: format!("builtin-bert-{}d-seed{seed}", config.hidden_size),
            encoder: TextEncoder {
                tokenizer: Arc::new(tokenizer),
                max_tokens: config.max_position_embeddings,
                prompts: Arc::default(),
            },
            config,
        }))
    }

    /// A Hugging Face sentence-embedding directory: `config.json`,
    /// `model.safetensors` and `tokenizer.json`, plus the sentence-transformers
    /// files when present (`modules.json`, the pooling module's
    /// `config.json`, `sentence_bert_config.json`). Without them the model
    /// mean-pools, does not normalize, and takes `max_position_embeddings`
    /// tokens.
    ///
    /// The tokenizer's own padding and truncation are turned off: batches are
    /// padded per sub-batch, and [`TextEncoder::encode`] decides about length.
    pub(crate) fn from_dir(dir: impl AsRef<Path>) -> Result<Self, LoadError> {
        let dir = required(dir.as_ref().to_owned(), "the model directory")?;
        let dir = dir.as_path();
        let config: Config = read_json(
            &dir.join("config.json"),
            "the BERT configuration of a Hugging Face model directory",
        )?;
        let weights = required(
            dir.join("model.safetensors"),
            "the weights in safetensors format (a pytorch_model.bin must be converted first)",
        )?;
        let tokenizer_path = required(
            dir.join("tokenizer.json"),
            "the tokenizer in the `tokenizers` JSON format",
        )?;
        let tokenizer = open_tokenizer(&tokenizer_path).map_err(|error| LoadError::Invalid {
            path: tokenizer_path,
            reason: error.to_string(),
        })?;

        // sentence-transformers: the module list names the pooling directory
        // and whether the pipeline ends in a Normalize module.
        let modules: Vec<StModule> = optional_json(&dir.join("modules.json"))?.unwrap_or_default();
        let pooling_dir = modules
            .iter()
            .find(|module| module.kind.ends_with(".Pooling"))
            .map_or("1_Pooling", |module| module.path.as_str());
        let pooling_path = dir.join(pooling_dir).join("config.json");
        let pooling = match optional_json::<StPooling>(&pooling_path)? {
            None => Pooling::Mean,
            Some(modes) => modes.pooling().map_err(|reason| LoadError::Invalid {
                path: pooling_path,
                reason,
            })?,
        };
        let normalize = modules
            .iter()
            .any(|module| module.kind.ends_with(".Normalize"));
        let max_tokens = optional_json::<StConfig>(&dir.join("sentence_bert_config.json"))?
            .and_then(|st| st.max_seq_length)
            .map_or(config.max_position_embeddings, |max| {
                max.min(config.max_position_embeddings)
            });
        // Room for [CLS] and [SEP] at least: truncation keeps both.
        if max_tokens < 2 {
            return Err(LoadError::Invalid {
                path: dir.join("sentence_bert_config.json"),
                reason: format!("max_seq_length {max_tokens} leaves no room for [CLS] and [SEP]"),
            });
        }

        let prompts = optional_json::<StPrompts>(&dir.join("config_sentence_transformers.json"))?
            .map(|config| config.prompts)
            .unwrap_or_default();

        let name = dir
            .canonicalize()
            .unwrap_or_else(|_| dir.to_owned())
            .file_name()
            .map_or_else(
                || "bert".to_owned(),
                |name| name.to_string_lossy().into_owned(),
            );
        Ok(Self(Arc::new(Inner {
            weights: Weights::File(weights),
            host_weights: LoadOnce::new(),
            config,
            pooling,
            normalize,
            name,
            encoder: TextEncoder {
                tokenizer: Arc::new(tokenizer),
                max_tokens,
                prompts: Arc::new(prompts),
            },
        })))
    }

    /// The tokenizer, for the request handlers.
    pub(crate) fn encoder(&self) -> TextEncoder {
        self.0.encoder.clone()
    }

    /// The length of an embedding.
    pub(crate) fn dimension(&self) -> usize {
        self.0.config.hidden_size
    }

    /// The most tokens one input may have, special tokens included.
    pub(crate) fn max_tokens(&self) -> usize {
        self.0.encoder.max_tokens
    }

    /// The model's name, for `/info`: the directory's name, or the built-in
    /// model's.
    pub(crate) fn name(&self) -> &str {
        &self.0.name
    }

    /// How token vectors are pooled.
    pub(crate) fn pooling(&self) -> Pooling {
        self.0.pooling
    }

    /// Whether the model is meant to be used L2-normalized (a sentence-transformers
    /// `Normalize` module; true for the built-in model).
    pub(crate) fn wants_normalization(&self) -> bool {
        self.0.normalize
    }
}

#[async_trait::async_trait]
impl Loader<Vec<u32>> for BertLoader {
    type Model = BertEmbedder;

    async fn load(&self, device: &Device) -> Result<BertEmbedder, BoxError> {
        let inner = &self.0;
        // Read on the CPU, once: only the tensors the model uses go to
        // `device`, converted to f32 on the way (on the CPU, f32 tensors are
        // shared as they are).
        let tensors = inner
            .host_weights
            .get_or_try_load(|| async {
                match &inner.weights {
                    Weights::Builtin { seed } => Ok(builtin_weights(&inner.config, *seed)?),
                    // Unreadable or malformed weights stay so: no retry can help.
                    Weights::File(path) => candle_core::safetensors::load(path, &Device::Cpu)
                        .map_err(|error| {
                            let message = format!("cannot read {}: {error}", path.display());
                            BoxError::from(Unrecoverable::new(message))
                        }),
                }
            })
            .await?;
        let vb = VarBuilder::from_tensors((*tensors).clone(), DType::F32, device);
        let model = BertModel::load(vb, &inner.config).map_err(|error| {
            Unrecoverable::new(format!("the weights do not fit the model: {error}"))
        })?;
        let warmup = ["warm up", "a longer sentence to warm up the model with"]
            .into_iter()
            .map(|text| inner.encoder.encode(text, Some(Direction::Right)))
            .collect::<Result<_, _>>()?;
        Ok(BertEmbedder {
            model,
            pooling: inner.pooling,
            pad_id: inner.config.pad_token_id as u32,
            warmup,
        })
    }

    fn cost(&self, input: &Vec<u32>) -> usize {
        input.len()
    }

    fn validate(&self, input: &Vec<u32>) -> Result<(), BoxError> {
        let max = self.max_tokens();
        let vocab_size = self.0.config.vocab_size;
        if input.is_empty() {
            Err(EncodeError::Empty.into())
        } else if input.len() > max {
            Err(EncodeError::TooLong {
                tokens: input.len(),
                max,
            }
            .into())
        } else if let Some(&id) = input.iter().find(|&&id| id as usize >= vocab_size) {
            Err(EncodeError::UnknownId { id, vocab_size }.into())
        } else {
            Ok(())
        }
    }
}

/// A BERT model on one device: token ids in, one pooled (not normalized)
/// embedding out.
pub(crate) struct BertEmbedder {
    model: BertModel,
    pooling: Pooling,
    pad_id: u32,
    warmup: Vec<Vec<u32>>,
}

impl fmt::Debug for BertEmbedder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BertEmbedder")
            .field("device", &self.model.device)
            .field("pooling", &self.pooling)
            .finish_non_exhaustive()
    }
}

impl BertEmbedder {
    /// Embeds sequences in one padded batch.
    fn embed(&self, sequences: &[&[u32]]) -> candle_core::Result<Vec<Vec<f32>>> {
        let batch = pad_sequences(sequences, self.pad_id, &self.model.device)?;
        let token_type_ids = batch.input_ids.zeros_like()?;
        // candle takes the 0/1 mask and turns it into additive biases itself.
        let hidden = self.model.forward(
            &batch.input_ids,
            &token_type_ids,
            Some(&batch.attention_mask),
        )?;
        let pooled = match self.pooling {
            Pooling::Cls => hidden.i((.., 0))?,
            Pooling::Mean => {
                let mask = batch
                    .attention_mask
                    .to_dtype(hidden.dtype())?
                    .unsqueeze(2)?;
                let sum = hidden.broadcast_mul(&mask)?.sum(1)?;
                sum.broadcast_div(&mask.sum(1)?)?
            }
        };
        pooled.to_dtype(DType::F32)?.to_vec2()
    }
}

impl Model<Vec<u32>> for BertEmbedder {
    type Output = Vec<f32>;

    /// Sorts the batch by length and runs sub-batches of similar length, so
    /// that one long input does not make every short one pay for its padding.
    fn forward(&self, batch: &[Vec<u32>]) -> Result<Vec<Vec<f32>>, BoxError> {
        let mut order: Vec<usize> = (0..batch.len()).collect();
        order.sort_by_key(|&index| batch[index].len());
        let lengths: Vec<usize> = order.iter().map(|&index| batch[index].len()).collect();
        let mut outputs = vec![Vec::new(); batch.len()];
        for group in length_groups(&lengths) {
            let group = &order[group];
            let sequences: Vec<&[u32]> = group.iter().map(|&index| &batch[index][..]).collect();
            for (&index, embedding) in group.iter().zip(self.embed(&sequences)?) {
                outputs[index] = embedding;
            }
        }
        Ok(outputs)
    }

    fn warmup_inputs(&self) -> Vec<Vec<u32>> {
        self.warmup.clone()
    }
}

/// Splits ascending `lengths` into consecutive groups whose padded size stays
/// within [`MAX_PADDING_TENTHS`] of their real size.
fn length_groups(lengths: &[usize]) -> Vec<Range<usize>> {
    let mut groups = Vec::new();
    let (mut start, mut real) = (0, 0);
    for (index, &len) in lengths.iter().enumerate() {
        let padded = (index - start + 1) * len;
        if index > start && padded * 10 > (real + len) * MAX_PADDING_TENTHS {
            groups.push(start..index);
            (start, real) = (index, 0);
        }
        real += len;
    }
    if start < lengths.len() {
        groups.push(start..lengths.len());
    }
    groups
}

/// L2-normalizes `v` in place; a zero vector stays zero.
pub(crate) fn normalize(v: &mut [f32]) {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        v.iter_mut().for_each(|x| *x /= norm);
    }
}

// ---- model directories ----

/// An entry of sentence-transformers' `modules.json`.
#[derive(serde::Deserialize)]
struct StModule {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    path: String,
}

/// sentence-transformers' pooling `config.json`.
#[derive(serde::Deserialize)]
struct StPooling {
    #[serde(default)]
    pooling_mode_cls_token: bool,
    #[serde(default)]
    pooling_mode_mean_tokens: bool,
    #[serde(default)]
    pooling_mode_max_tokens: bool,
    #[serde(default)]
    pooling_mode_mean_sqrt_len_tokens: bool,
}

impl StPooling {
    fn pooling(&self) -> Result<Pooling, String> {
        match (
            self.pooling_mode_cls_token,
            self.pooling_mode_mean_tokens,
            self.pooling_mode_max_tokens || self.pooling_mode_mean_sqrt_len_tokens,
        ) {
            (true, false, false) => Ok(Pooling::Cls),
            (false, true, false) => Ok(Pooling::Mean),
            _ => Err("only exactly one of CLS and mean pooling is supported".to_owned()),
        }
    }
}

/// sentence-transformers' `sentence_bert_config.json`.
#[derive(serde::Deserialize)]
struct StConfig {
    max_seq_length: Option<usize>,
}

/// `config_sentence_transformers.json`: named prompts, prepended to an input
/// on request (`prompt_name`).
#[derive(Debug, Default, serde::Deserialize)]
struct StPrompts {
    #[serde(default)]
    prompts: HashMap<String, String>,
}

/// A `tokenizer.json` with its padding and truncation turned off.
fn open_tokenizer(path: &Path) -> tokenizers::Result<Tokenizer> {
    let mut tokenizer = Tokenizer::from_file(path)?;
    tokenizer.with_padding(None).with_truncation(None)?;
    Ok(tokenizer)
}

/// `path` if it exists.
fn required(path: PathBuf, hint: &'static str) -> Result<PathBuf, LoadError> {
    if path.exists() {
        Ok(path)
    } else {
        Err(LoadError::Missing { path, hint })
    }
}

fn read_json<T: serde::de::DeserializeOwned>(
    path: &Path,
    hint: &'static str,
) -> Result<T, LoadError> {
    let path = required(path.to_owned(), hint)?;
    let invalid = |reason: String| LoadError::Invalid {
        path: path.clone(),
        reason,
    };
    let text = std::fs::read_to_string(&path).map_err(|error| invalid(error.to_string()))?;
    serde_json::from_str(&text).map_err(|error| invalid(error.to_string()))
}

fn optional_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Option<T>, LoadError> {
    if path.exists() {
        read_json(path, "").map(Some)
    } else {
        Ok(None)
    }
}

// ---- the built-in model ----

/// Common English words, so that real sentences tokenize into whole words.
const COMMON_WORDS: &str = "the of and to a in is it you that he was for on are with as i his
they be at one have this from or had by not word but what some we can out other were all there
when up use your how said an each she which do their time if will way about many then them write
would like so these her long make thing see him two has look more day could go come did number
sound no most people my over know water than call first who may down side been now find any new
work part take get place made live where after back little only round man year came show every
good me give our under name very through just form sentence great think say help low line differ
turn cause much mean before move right boy old too same tell does set three want air well also
play small end put home read hand port large spell add even land here must big high such follow
act why ask men change went light kind off need house picture try us again animal point mother
world near build self earth father head stand own page should country found answer school grow
study still learn plant cover food sun four between state keep eye never last let thought city
tree cross farm hard start might story saw far sea draw left late run while press close night
real life few north open seem together next white children begin got walk example ease paper
group always music those both mark often letter until mile river car feet care second book carry
took science eat room friend began idea fish mountain stop once base hear horse cut sure watch
color face wood main enough plain girl usual young ready above ever red list though feel talk
bird soon body dog family direct pose leave song measure door product black short numeral class
wind question happen complete ship area half rock order fire south problem piece told knew pass
since top whole king space heard best hour better true during hundred five remember step early
hold west ground interest reach fast verb sing listen six table travel less morning ten simple
several vowel toward war lay against pattern slow center love person money serve appear road map
rain rule govern pull cold notice voice unit power town fine certain fly fall lead cry dark
machine note wait plan figure star box noun field rest correct able pound done beauty drive stood
contain front teach week final gave green oh quick develop ocean warm free minute strong special
mind behind clear tail produce fact street inch multiply nothing course stay wheel full force
blue object decide surface deep moon island foot system busy test record boat common gold
possible plane stead dry wonder laugh thousand ago ran check game shape equate hot miss brought
heat snow tire bring yes distant fill east paint language among playing guitar someone instrument
stock market today sharply fell hello weather happy sad cat computer phone";

fn builtin_vocab() -> Vec<String> {
    // The special tokens first: `builtin_tokenizer` relies on their ids.
    let mut vocab: Vec<String> = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        .map(String::from)
        .into();
    let chars: Vec<char> = ('a'..='z')
        .chain('0'..='9')
        .chain((' '..='~').filter(char::is_ascii_punctuation))
        .collect();
    vocab.extend(chars.iter().map(char::to_string));
    vocab.extend(chars.iter().map(|c| format!("##{c}")));
    for word in COMMON_WORDS.split_whitespace() {
        if !vocab.iter().any(|known| known == word) {
            vocab.push(word.to_owned());
        }
    }
    vocab
}

fn builtin_tokenizer(vocab: &[String]) -> tokenizers::Result<Tokenizer> {
    let wordpiece = WordPiece::builder()
        .vocab(WordPiece::read_bytes(vocab.join("\n").as_bytes())?)
        .unk_token("[UNK]".to_owned())
        .build()?;
    let template = TemplateProcessing::builder()
        .try_single("[CLS] $A [SEP]")?
        .special_tokens(vec![("[CLS]", 2), ("[SEP]", 3)])
        .build()?;
    let mut tokenizer = Tokenizer::new(wordpiece);
    tokenizer
        .with_normalizer(Some(BertNormalizer::default()))
        .with_pre_tokenizer(Some(BertPreTokenizer))
        .with_post_processor(Some(template));
    Ok(tokenizer)
}

/// splitmix64: a tiny, well-mixed, seedable generator.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `[-0.02·√3, 0.02·√3)`: a standard deviation of 0.02.
    fn weight(&mut self) -> f32 {
        let unit = (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
        (2.0 * unit - 1.0) * 0.02 * 3f32.sqrt()
    }
}

/// The weights of the built-in model, named as candle's `BertModel` loads
/// them, drawn in a fixed order so that a seed always gives the same model.
fn builtin_weights(config: &Config, seed: u64) -> candle_core::Result<HashMap<String, Tensor>> {
    struct Generator {
        rng: SplitMix64,
        tensors: HashMap<String, Tensor>,
    }
    impl Generator {
        fn random(&mut self, name: String, shape: (usize, usize)) -> candle_core::Result<()> {
            let values = (0..shape.0 * shape.1).map(|_| self.rng.weight()).collect();
            let tensor = Tensor::from_vec(values, shape, &Device::Cpu)?;
            self.tensors.insert(name, tensor);
            Ok(())
        }
        fn constant(&mut self, name: String, size: usize, value: f32) -> candle_core::Result<()> {
            let tensor = Tensor::full(value, size, &Device::Cpu)?;
            self.tensors.insert(name, tensor);
            Ok(())
        }
        fn linear(&mut self, prefix: &str, out: usize, inp: usize) -> candle_core::Result<()> {
            self.random(format!("{prefix}.weight"), (out, inp))?;
            self.constant(format!("{prefix}.bias"), out, 0.0)
        }
        fn layer_norm(&mut self, prefix: &str, size: usize) -> candle_core::Result<()> {
            self.constant(format!("{prefix}.weight"), size, 1.0)?;
            self.constant(format!("{prefix}.bias"), size, 0.0)
        }
    }

    let (hidden, inter) = (config.hidden_size, config.intermediate_size);
    let mut w = Generator {
        rng: SplitMix64(seed),
        tensors: HashMap::new(),
    };
    for (table, rows) in [
        ("word", config.vocab_size),
        ("position", config.max_position_embeddings),
        ("token_type", config.type_vocab_size),
    ] {
        w.random(
            format!("embeddings.{table}_embeddings.weight"),
            (rows, hidden),
        )?;
    }
    w.layer_norm("embeddings.LayerNorm", hidden)?;
    for layer in 0..config.num_hidden_layers {
        let p = format!("encoder.layer.{layer}");
        for part in ["query", "key", "value"] {
            w.linear(&format!("{p}.attention.self.{part}"), hidden, hidden)?;
        }
        w.linear(&format!("{p}.attention.output.dense"), hidden, hidden)?;
        w.layer_norm(&format!("{p}.attention.output.LayerNorm"), hidden)?;
        w.linear(&format!("{p}.intermediate.dense"), inter, hidden)?;
        w.linear(&format!("{p}.output.dense"), hidden, inter)?;
        w.layer_norm(&format!("{p}.output.LayerNorm"), hidden)?;
    }
    Ok(w.tensors)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn length_groups_bound_the_padding() {
        let sizes = |lengths: &[usize]| -> Vec<usize> {
            length_groups(lengths)
                .into_iter()
                .map(|g| g.len())
                .collect()
        };
        assert!(sizes(&[]).is_empty());
        assert_eq!(sizes(&[7]), [1]);
        assert_eq!(sizes(&[5, 5, 5, 5]), [4]);
        assert_eq!(sizes(&[2, 2, 2, 10, 11, 40]), [3, 2, 1]);
    }

    #[test]
    fn normalize_gives_unit_norm_and_keeps_zero() {
        let mut v = [3.0, 4.0];
        normalize(&mut v);
        assert_eq!(v, [0.6, 0.8]);
        let mut zero = [0.0; 3];
        normalize(&mut zero);
        assert_eq!(zero, [0.0; 3]);
    }
}
