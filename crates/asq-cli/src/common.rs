//! Pieces shared by the commands: where the data is, progress bars, accuracy passes.

use std::path::{Path, PathBuf};
use std::time::Instant;

use asq_train::checkpoint::TrainState;
use asq_train::data::idx::FASHION_MNIST_DIR;
use asq_train::data::loader::make_batch;
use asq_train::data::{Dataset, Normalize};
use asq_train::train::{BatchStats, Callback, Control};
use asq_train::ParamStore;
use indicatif::{ProgressBar, ProgressStyle};

/// Errors of the commands: printed as `asq: error: ...`, exit code 1.
pub type Error = Box<dyn std::error::Error>;

/// The Fashion-MNIST directory: `--data`, else the Debian package's, else the shipped subset.
pub fn data_dir(arg: &Option<PathBuf>) -> Result<PathBuf, Error> {
    if let Some(d) = arg {
        return Ok(d.clone());
    }
    let debian = Path::new(FASHION_MNIST_DIR);
    if debian.join("train-images-idx3-ubyte.gz").exists() {
        return Ok(debian.to_path_buf());
    }
    let shipped =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../asq-train/data/fashion-mnist-subset");
    if shipped.join("train-images-idx3-ubyte.gz").exists() {
        return Ok(shipped);
    }
    Err(format!(
        "no Fashion-MNIST found: install the Debian package dataset-fashion-mnist ({FASHION_MNIST_DIR}) or pass --data DIR"
    )
    .into())
}

/// A progress bar over training batches that also keeps every batch's loss and accuracy.
pub struct Bar(pub ProgressBar, pub Vec<(f64, f64)>);

impl Bar {
    /// A bar of `total` batches labelled `what`.
    pub fn new(total: u64, what: &str) -> Self {
        let bar = ProgressBar::new(total);
        bar.set_style(
            ProgressStyle::with_template("{prefix:>10} [{bar:30}] {pos}/{len} {msg}")
                .expect("static template")
                .progress_chars("=> "),
        );
        bar.set_prefix(what.to_string());
        Self(bar, Vec::new())
    }
}

impl Callback for Bar {
    fn on_batch(&mut self, s: &BatchStats, _: &ParamStore, _: &TrainState) -> Control {
        self.0.inc(1);
        self.1
            .push((s.loss as f64, s.correct as f64 / s.size.max(1) as f64));
        self.0.set_message(format!(
            "epoch {} loss {:.3} acc {:.2} lr {:.4} {:.0} img/s",
            s.epoch + 1,
            s.loss,
            s.correct as f64 / s.size as f64,
            s.lr,
            s.images_per_sec
        ));
        Control::Continue
    }
}

/// Accuracy and images/s of a forward pass over `test`.
pub fn measure(
    test: &Dataset,
    normalize: &Normalize,
    batch: usize,
    mut logits: impl FnMut(&asq_train::Tensor) -> Result<Vec<f32>, Error>,
) -> Result<(f64, f64), Error> {
    let t = Instant::now();
    let mut correct = 0usize;
    let idx: Vec<usize> = (0..test.len()).collect();
    for chunk in idx.chunks(batch) {
        let b = make_batch(test, chunk, normalize, None)?;
        let out = logits(&b.images)?;
        let classes = out.len() / chunk.len();
        for (row, &y) in out.chunks(classes).zip(&b.labels) {
            let best = row
                .iter()
                .enumerate()
                .fold(
                    (0, f32::NEG_INFINITY),
                    |m, (i, &v)| if v > m.1 { (i, v) } else { m },
                )
                .0;
            correct += (best == y) as usize;
        }
    }
    Ok((
        correct as f64 / test.len() as f64,
        test.len() as f64 / t.elapsed().as_secs_f64(),
    ))
}

/// Fails early, before any work, when `path` cannot be written: its directory must exist.
pub fn check_output(path: &Path) -> Result<(), Error> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if !dir.is_dir() {
        return Err(format!(
            "{}: directory {} does not exist",
            path.display(),
            dir.display()
        )
        .into());
    }
    if path.is_dir() {
        return Err(format!("{} is a directory, not a file", path.display()).into());
    }
    Ok(())
}
