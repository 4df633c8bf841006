//! `asq`: the command line of the asq toolkit.
//!
//! `asq demo` runs the main job end to end (train, quantize, export, integer inference, report);
//! `asq train`, `asq export` and `asq eval` run its steps on files; `asq table` trains the
//! accuracy table of quantization methods; `asq plot` draws betas and weight histograms;
//! `asq bench kernels` measures
//! the integer kernels; `asq info` reports what this CPU runs.

mod bench;
mod calibrate;
mod common;
mod demo;
mod eval;
mod export;
mod export_safetensors;
mod figures;
mod images;
mod import;
mod info;
mod inspect;
mod plot;
mod predict;
mod recipe;
mod table;
mod train;

use asq_train::ops::conv::{with_conv_precision, ConvPrecision};
use clap::{Parser, Subcommand};

/// Low-bit QAT and integer inference with ASQ activations and POST weights.
#[derive(Parser)]
#[command(name = "asq", version, about, long_about = None)]
struct Cli {
    /// Worker threads of every command (default: RAYON_NUM_THREADS, else one per CPU;
    /// `bench` commands take their own `--threads`).
    #[arg(long, short, global = true)]
    jobs: Option<usize>,
    /// Convolution precision of training and float evaluation: `fast` (Winograd F(4x4, 3x3)
    /// on AVX2 machines, ~1e-6 relative rounding) or `highest` (rounding of the direct sum's
    /// order, ~2e-7: for step-by-step comparisons with PyTorch).
    #[arg(long, global = true, default_value = "fast")]
    conv_precision: ConvPrecision,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train ResNet-20 on Fashion-MNIST, fine-tune it as W4A4 ASQ+POST, export it to the integer
    /// engine and report accuracy and speed of the float, fake-quant and integer models.
    Demo(demo::DemoArgs),
    /// Train a zoo model on Fashion-MNIST (full precision or quantization-aware) and save a
    /// checkpoint.
    Train(train::TrainArgs),
    /// Post-training quantization: a full-precision checkpoint quantized with its step sizes
    /// and alphas calibrated on training images; reports the PTQ accuracy.
    Calibrate(calibrate::CalibrateArgs),
    /// Export a quantized checkpoint to an integer-engine model file (.asqm).
    Export(export::ExportArgs),
    /// Read a PyTorch state dict (safetensors) into a checkpoint.
    Import(import::ImportArgs),
    /// Write a checkpoint as a PyTorch state dict (safetensors), quantizer parameters included.
    ExportSafetensors(export_safetensors::ExportSafetensorsArgs),
    /// Test accuracy and speed of a model file (integer engine) or a checkpoint.
    Eval(eval::EvalArgs),
    /// Logits of a model (.asqm or checkpoint) for images in a float32 .npy array.
    Predict(predict::PredictArgs),
    /// Show what a model file (.asqm) holds, layer by layer.
    Inspect(inspect::InspectArgs),
    /// The accuracy table: quantization methods x bit widths, each fine-tuned from one
    /// full-precision run (resumable; writes results.md).
    Table(table::TableArgs),
    /// Draw what quantized checkpoints learnt: ASQ's beta per layer over test images, weight
    /// histograms with the POT and POST levels (SVG).
    Plot(figures::PlotArgs),
    /// Measure kernels against f32 sgemm and the machine's peaks, in one process.
    Bench {
        #[command(subcommand)]
        what: BenchWhat,
    },
    /// Show the CPU features and kernel variants this machine runs.
    Info,
}

#[derive(Subcommand)]
enum BenchWhat {
    /// Integer GEMM paths (int8, POST W4/W3/W2 A8, exact POST) vs matrixmultiply sgemm.
    Kernels(bench::KernelArgs),
    /// Zoo models on the integer engine vs their FP32 graph, images/s.
    Models(bench::ModelArgs),
    /// Training throughput (forward, backward, SGD update), images/s.
    Train(bench::TrainBenchArgs),
}

fn main() {
    let cli = Cli::parse();
    if let Some(n) = cli.jobs {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global();
        if n == 0 || pool.is_err() {
            eprintln!("asq: error: --jobs {n}: needs a positive thread count");
            std::process::exit(1);
        }
    }
    let result = with_conv_precision(cli.conv_precision, || match cli.command {
        Command::Demo(args) => demo::run(&args),
        Command::Train(args) => train::train(&args),
        Command::Export(args) => export::export(&args),
        Command::Calibrate(args) => calibrate::calibrate(&args),
        Command::Import(args) => import::import(&args),
        Command::ExportSafetensors(args) => export_safetensors::export_safetensors(&args),
        Command::Eval(args) => eval::eval(&args),
        Command::Inspect(args) => inspect::inspect(&args),
        Command::Predict(args) => predict::predict(&args),
        Command::Table(args) => table::table(&args),
        Command::Plot(args) => figures::plot(&args),
        Command::Bench {
            what: BenchWhat::Kernels(args),
        } => bench::kernels(&args),
        Command::Bench {
            what: BenchWhat::Models(args),
        } => bench::models(&args),
        Command::Bench {
            what: BenchWhat::Train(args),
        } => bench::train(&args),
        Command::Info => {
            info::info();
            Ok(())
        }
    });
    if let Err(e) = result {
        eprintln!("asq: error: {e}");
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn the_command_line_definition_is_consistent() {
        // clap's own checks (duplicate names, conflicting globals...), run in every build.
        super::Cli::command().debug_assert();
    }
}
