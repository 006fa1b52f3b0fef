//! Collation for the common Candle case: variable-length token-id sequences in,
//! one tensor per request out.
//!
//! # Examples
//!
//! ```
//! use candle_core::Device;
//! use candlewick::collate::{pad_sequences, split_rows};
//!
//! let batch = pad_sequences(&[vec![101, 7, 102], vec![101, 102]], 0, &Device::Cpu)?;
//! assert_eq!(batch.input_ids.to_vec2::<u32>()?, [[101, 7, 102], [101, 102, 0]]);
//! assert_eq!(batch.attention_mask.to_vec2::<u32>()?, [[1, 1, 1], [1, 1, 0]]);
//!
//! // ... run the model on the batch, then hand each request its own row.
//! let rows = split_rows(&batch.attention_mask)?;
//! assert_eq!(rows[1].to_vec1::<u32>()?, [1, 1, 0]);
//! # Ok::<_, candle_core::Error>(())
//! ```

use candle_core::{Device, Result, Tensor};

/// Token sequences padded to a common length, ready for a transformer.
#[derive(Debug, Clone)]
pub struct PaddedBatch {
    /// `(batch, longest)` `u32` token ids, padded on the right.
    pub input_ids: Tensor,
    /// `(batch, longest)` `u32`: 1 for real tokens, 0 for padding.
    pub attention_mask: Tensor,
    /// The real length of each sequence.
    pub lengths: Vec<usize>,
}

impl PaddedBatch {
    /// The padded length shared by every row.
    pub fn padded_len(&self) -> usize {
        self.lengths.iter().copied().max().unwrap_or(0)
    }
}

/// Pads `sequences` on the right with `pad_id` to the longest one and stacks
/// them, with the matching attention mask, on `device`.
///
/// An empty batch, or one whose sequences are all empty, gives tensors with a
/// zero dimension rather than an error.
pub fn pad_sequences<S: AsRef<[u32]>>(
    sequences: &[S],
    pad_id: u32,
    device: &Device,
) -> Result<PaddedBatch> {
    let lengths: Vec<usize> = sequences.iter().map(|s| s.as_ref().len()).collect();
    let longest = lengths.iter().copied().max().unwrap_or(0);
    let mut ids = Vec::with_capacity(sequences.len() * longest);
    let mut mask = Vec::with_capacity(sequences.len() * longest);
    for sequence in sequences {
        let sequence = sequence.as_ref();
        ids.extend_from_slice(sequence);
        ids.resize(ids.len() + longest - sequence.len(), pad_id);
        mask.resize(mask.len() + sequence.len(), 1u32);
        mask.resize(mask.len() + longest - sequence.len(), 0u32);
    }
    let shape = (sequences.len(), longest);
    Ok(PaddedBatch {
        input_ids: Tensor::from_vec(ids, shape, device)?,
        attention_mask: Tensor::from_vec(mask, shape, device)?,
        lengths,
    })
}

/// Splits a batched output along its first dimension: one tensor per request.
pub fn split_rows(batched: &Tensor) -> Result<Vec<Tensor>> {
    let rows = batched.dim(0)?;
    (0..rows).map(|row| batched.get(row)).collect()
}

/// Splits a `(batch, longest, ...)` per-token output into one tensor per
/// request, each cut back to that request's real length.
pub fn split_unpadded(batched: &Tensor, lengths: &[usize]) -> Result<Vec<Tensor>> {
    let rows = batched.dim(0)?;
    if rows != lengths.len() {
        candle_core::bail!("a batch of {rows} rows with {} lengths", lengths.len());
    }
    lengths
        .iter()
        .enumerate()
        .map(|(row, &len)| batched.get(row)?.narrow(0, 0, len))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pads_to_the_longest_and_masks_the_padding() -> Result<()> {
        let batch = pad_sequences(&[vec![1, 2], vec![3, 4, 5, 6], vec![7]], 9, &Device::Cpu)?;
        assert_eq!(
            batch.input_ids.to_vec2::<u32>()?,
            [[1, 2, 9, 9], [3, 4, 5, 6], [7, 9, 9, 9]]
        );
        assert_eq!(
            batch.attention_mask.to_vec2::<u32>()?,
            [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
        );
        assert_eq!(batch.lengths, [2, 4, 1]);
        assert_eq!(batch.padded_len(), 4);
        Ok(())
    }

    #[test]
    fn an_empty_batch_gives_empty_tensors() -> Result<()> {
        let batch = pad_sequences::<Vec<u32>>(&[], 0, &Device::Cpu)?;
        assert_eq!(batch.input_ids.dims(), [0, 0]);
        assert!(split_rows(&batch.input_ids)?.is_empty());
        Ok(())
    }

    #[test]
    fn split_rows_gives_each_request_its_row() -> Result<()> {
        let out = Tensor::arange(0f32, 6.0, &Device::Cpu)?.reshape((3, 2))?;
        let rows = split_rows(&out)?;
        assert_eq!(rows.len(), 3);
        assert_eq!(rows[2].to_vec1::<f32>()?, [4.0, 5.0]);
        Ok(())
    }

    #[test]
    fn split_unpadded_cuts_each_row_to_its_length() -> Result<()> {
        let batch = pad_sequences(&[vec![1, 2, 3], vec![4]], 0, &Device::Cpu)?;
        // A per-token output with a hidden size of 2.
        let hidden = batch
            .input_ids
            .to_dtype(candle_core::DType::F32)?
            .unsqueeze(2)?
            .repeat((1, 1, 2))?;
        let rows = split_unpadded(&hidden, &batch.lengths)?;
        assert_eq!(
            rows[0].to_vec2::<f32>()?,
            [[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]]
        );
        assert_eq!(rows[1].to_vec2::<f32>()?, [[4.0, 4.0]]);
        assert!(split_unpadded(&hidden, &[1]).is_err());
        Ok(())
    }
}
