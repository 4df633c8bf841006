//! Normalisation, augmentation and seeded mini-batches.

use ndarray::IxDyn;
use serde::{Deserialize, Serialize};

use crate::data::Dataset;
use crate::error::{Error, Result};
use crate::rng::Rng;
use crate::Tensor;

/// Per-channel normalisation of pixels scaled to [0, 1]: `(p / 255 - mean) / std`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Normalize {
    /// Channel means.
    pub mean: Vec<f32>,
    /// Channel standard deviations.
    pub std: Vec<f32>,
}

/// Training augmentation, applied to raw pixels before normalisation (as torchvision does).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Augment {
    /// Random crop back to the original size after zero-padding by this many pixels.
    pub crop_pad: usize,
    /// Random horizontal flip with probability 1/2.
    pub hflip: bool,
}

/// A mini-batch: images `[B, C, H, W]` and labels.
#[derive(Debug, Clone)]
pub struct Batch {
    /// Normalised images.
    pub images: Tensor,
    /// Class indices.
    pub labels: Vec<usize>,
}

/// The shuffled order of epoch `epoch` for a dataset of `n` images: a pure function of the
/// seed and the epoch, so a resumed run sees the same batches.
pub fn epoch_order(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    Rng::new(seed ^ epoch.wrapping_mul(0x9e37_79b9_7f4a_7c15)).shuffle(&mut order);
    order
}

/// The random generator of batch `batch` of epoch `epoch` (augmentation, dropout).
pub fn batch_rng(seed: u64, epoch: u64, batch: u64) -> Rng {
    Rng::new(
        seed.wrapping_add(0x5851_f42d_4c95_7f2d)
            .wrapping_mul(epoch + 1)
            .wrapping_add(batch.wrapping_mul(0x1405_7b7e_f767_814f)),
    )
}

/// Builds a batch from images `indices`, normalised, augmented when `augment` is given.
pub fn make_batch(
    data: &Dataset,
    indices: &[usize],
    norm: &Normalize,
    augment: Option<(&Augment, &mut Rng)>,
) -> Result<Batch> {
    if norm.mean.len() != data.c
        || norm.std.len() != data.c
        || norm.std.iter().any(|s| !s.is_finite() || *s <= 0.0)
    {
        return Err(Error::Config(format!(
            "normalisation for {} channels: {norm:?}",
            data.c
        )));
    }
    let (c, h, w) = (data.c, data.h, data.w);
    let mut out = vec![0.0f32; indices.len() * c * h * w];
    let mut augment = augment;
    for (b, &i) in indices.iter().enumerate() {
        if i >= data.len() {
            return Err(Error::Config(format!(
                "image index {i} outside a dataset of {}",
                data.len()
            )));
        }
        let img = data.image(i);
        let (dy, dx, flip) = match augment.as_mut() {
            Some((a, rng)) => {
                let p = a.crop_pad;
                let (dy, dx) = if p > 0 {
                    (
                        rng.below(2 * p + 1) as isize - p as isize,
                        rng.below(2 * p + 1) as isize - p as isize,
                    )
                } else {
                    (0, 0)
                };
                (dy, dx, a.hflip && rng.below(2) == 1)
            }
            None => (0, 0, false),
        };
        for ch in 0..c {
            let (m, s) = (norm.mean[ch], norm.std[ch]);
            let dst = &mut out[((b * c + ch) * h) * w..][..h * w];
            for y in 0..h {
                for x in 0..w {
                    let sx = if flip { w - 1 - x } else { x };
                    let (iy, ix) = (y as isize + dy, sx as isize + dx);
                    let p = if iy >= 0 && ix >= 0 && (iy as usize) < h && (ix as usize) < w {
                        img[(ch * h + iy as usize) * w + ix as usize]
                    } else {
                        0
                    };
                    dst[y * w + x] = (p as f32 / 255.0 - m) / s;
                }
            }
        }
    }
    let labels = indices.iter().map(|&i| data.labels[i] as usize).collect();
    Ok(Batch {
        images: Tensor::from_shape_vec(IxDyn(&[indices.len(), c, h, w]), out).expect("shape"),
        labels,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> Dataset {
        Dataset {
            images: (0..2 * 9).map(|v| v as u8 * 10).collect(),
            labels: vec![1, 2],
            c: 1,
            h: 3,
            w: 3,
            classes: 3,
        }
    }

    #[test]
    fn orders_are_permutations_and_reproducible() {
        let a = epoch_order(100, 7, 3);
        assert_eq!(a, epoch_order(100, 7, 3));
        assert_ne!(a, epoch_order(100, 7, 4));
        let mut s = a.clone();
        s.sort();
        assert_eq!(s, (0..100).collect::<Vec<_>>());
    }

    #[test]
    fn normalisation_flip_and_crop() {
        let d = tiny();
        let norm = Normalize {
            mean: vec![0.0],
            std: vec![1.0 / 255.0],
        }; // values = raw pixels
        let b = make_batch(&d, &[1, 0], &norm, None).unwrap();
        assert_eq!(b.labels, vec![2, 1]);
        assert!((b.images[[0, 0, 0, 0]] - 90.0).abs() < 1e-3);
        // Find a flip without crop: with pad 0 only flips happen.
        let aug = Augment {
            crop_pad: 0,
            hflip: true,
        };
        let mut rng = Rng::new(1);
        let mut flipped = false;
        for _ in 0..20 {
            let b = make_batch(&d, &[0], &norm, Some((&aug, &mut rng))).unwrap();
            let v = b.images[[0, 0, 0, 0]];
            assert!((v - 0.0).abs() < 1e-3 || (v - 20.0).abs() < 1e-3);
            flipped |= (v - 20.0).abs() < 1e-3;
        }
        assert!(flipped);
        // Crops shift by at most the padding and fill with zeros.
        let aug = Augment {
            crop_pad: 1,
            hflip: false,
        };
        let b = make_batch(&d, &[0, 0, 0, 0, 0, 0], &norm, Some((&aug, &mut rng))).unwrap();
        assert!(b
            .images
            .iter()
            .all(|&v| v.round() % 10.0 == 0.0 && v <= 80.5));
        assert!(make_batch(&d, &[5], &norm, None).is_err());
        assert!(make_batch(
            &d,
            &[0],
            &Normalize {
                mean: vec![0.0],
                std: vec![0.0]
            },
            None
        )
        .is_err());
    }
}
