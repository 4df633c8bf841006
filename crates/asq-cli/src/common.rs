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

/// The data directory: `--data` (MNIST-layout IDX files, e.g. Fashion-MNIST, or CIFAR-10
/// binary batches), else the Debian package's Fashion-MNIST, else the shipped subset.
pub fn data_dir(arg: &Option<PathBuf>) -> Result<PathBuf, Error> {
    if let Some(d) = arg {
        let has = |name: &str| d.join(name).exists() || d.join(format!("{name}.gz")).exists();
        let idx = has("train-images-idx3-ubyte") && has("t10k-images-idx3-ubyte");
        if !idx && asq_train::data::cifar::cifar_dir(d).is_none() {
            return Err(format!(
                "--data {}: neither Fashion-MNIST IDX files (train-images-idx3-ubyte.gz, t10k-images-idx3-ubyte.gz and their labels) nor CIFAR-10 binary batches (data_batch_1.bin ... test_batch.bin, or cifar-10-batches-bin/) there; install the Debian package dataset-fashion-mnist ({FASHION_MNIST_DIR}) or pass the directory that holds them",
                d.display()
            )
            .into());
        }
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
    logits: impl FnMut(&asq_train::Tensor) -> Result<Vec<f32>, Error>,
) -> Result<(f64, f64), Error> {
    let (confusion, speed) = confusion(test, normalize, batch, logits)?;
    Ok((confusion.accuracy(), speed))
}

/// Counts of (true class, predicted class) over a test set.
pub struct Confusion {
    /// `counts[truth][prediction]`.
    pub counts: Vec<Vec<usize>>,
}

/// Fashion-MNIST's class names (the label order of its IDX files).
pub const FASHION_CLASSES: [&str; 10] = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
];

impl Confusion {
    /// Fraction of correct predictions.
    pub fn accuracy(&self) -> f64 {
        let total: usize = self.counts.iter().flatten().sum();
        let right: usize = (0..self.counts.len()).map(|c| self.counts[c][c]).sum();
        right as f64 / total.max(1) as f64
    }

    /// A markdown table: per class, its accuracy and what it is most often mistaken for.
    pub fn table(&self) -> String {
        let name = |c: usize| {
            FASHION_CLASSES
                .get(c)
                .map_or_else(|| format!("class {c}"), |n| n.to_string())
        };
        let mut out = String::from(
            "| class | images | accuracy | most often predicted instead |\n|---|---|---|---|\n",
        );
        for (c, row) in self.counts.iter().enumerate() {
            let n: usize = row.iter().sum();
            if n == 0 {
                continue;
            }
            let worst = (0..row.len())
                .filter(|&p| p != c && row[p] > 0)
                .max_by_key(|&p| row[p])
                .map_or(String::new(), |p| {
                    format!("{} ({:.1} %)", name(p), 100.0 * row[p] as f64 / n as f64)
                });
            out.push_str(&format!(
                "| {} | {n} | {:.1} % | {worst} |\n",
                name(c),
                100.0 * row[c] as f64 / n as f64
            ));
        }
        out
    }
}

/// The confusion counts and images/s of a forward pass over `test`.
pub fn confusion(
    test: &Dataset,
    normalize: &Normalize,
    batch: usize,
    mut logits: impl FnMut(&asq_train::Tensor) -> Result<Vec<f32>, Error>,
) -> Result<(Confusion, f64), Error> {
    let t = Instant::now();
    let k = test.classes.max(1);
    let mut counts = vec![vec![0usize; k]; k];
    let idx: Vec<usize> = (0..test.len()).collect();
    for chunk in idx.chunks(batch) {
        let b = make_batch(test, chunk, normalize, None)?;
        let out = logits(&b.images)?;
        let classes = out.len() / chunk.len();
        if classes != k {
            return Err(format!("the model has {classes} outputs, the data {k} classes").into());
        }
        for (row, &y) in out.chunks(classes).zip(&b.labels) {
            let best = row
                .iter()
                .enumerate()
                .fold(
                    (0, f32::NEG_INFINITY),
                    |m, (i, &v)| if v > m.1 { (i, v) } else { m },
                )
                .0;
            counts[y][best] += 1;
        }
    }
    Ok((
        Confusion { counts },
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

/// [`check_output`], and an existing file is an error unless `force`: nothing the user had is
/// replaced by accident.
pub fn check_new_output(path: &Path, force: bool) -> Result<(), Error> {
    check_output(path)?;
    if path.exists() && !force {
        return Err(format!("{} exists: pass --force to replace it", path.display()).into());
    }
    Ok(())
}
