//! Data: IDX (MNIST, Fashion-MNIST) and CIFAR-10 binary readers, `.npy` float32 arrays,
//! normalisation, augmentation and seeded mini-batches.

pub mod cifar;
pub mod idx;
pub mod loader;
pub mod npy;

pub use loader::{Augment, Batch, Normalize};

/// An image classification dataset held as bytes: `[n, c, h, w]` pixels in 0..=255 and labels.
#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    /// Pixels, NCHW.
    pub images: Vec<u8>,
    /// One label per image.
    pub labels: Vec<u8>,
    /// Channels.
    pub c: usize,
    /// Height.
    pub h: usize,
    /// Width.
    pub w: usize,
    /// Number of classes.
    pub classes: usize,
}

impl Dataset {
    /// Number of images.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether there are no images.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Pixels of image `i`.
    pub fn image(&self, i: usize) -> &[u8] {
        let n = self.c * self.h * self.w;
        &self.images[i * n..(i + 1) * n]
    }

    /// The first `n` images (or all).
    pub fn take(&self, n: usize) -> Dataset {
        let n = n.min(self.len());
        let px = self.c * self.h * self.w;
        Dataset {
            images: self.images[..n * px].to_vec(),
            labels: self.labels[..n].to_vec(),
            ..*self
        }
    }

    /// Per-channel mean and standard deviation of pixels scaled to [0, 1].
    pub fn channel_stats(&self) -> Normalize {
        let hw = self.h * self.w;
        let mut sum = vec![0.0f64; self.c];
        let mut sq = vec![0.0f64; self.c];
        for i in 0..self.len() {
            for (ch, px) in self.image(i).chunks(hw).enumerate() {
                for &p in px {
                    let v = p as f64 / 255.0;
                    sum[ch] += v;
                    sq[ch] += v * v;
                }
            }
        }
        let count = (self.len() * hw).max(1) as f64;
        let mean: Vec<f32> = sum.iter().map(|s| (s / count) as f32).collect();
        let std = sq
            .iter()
            .zip(&mean)
            .map(|(q, &m)| ((q / count - (m as f64).powi(2)).max(1e-12).sqrt()) as f32)
            .collect();
        Normalize { mean, std }
    }
}
