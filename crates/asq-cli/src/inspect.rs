//! `asq inspect`: what a model file holds, node by node.

use std::path::PathBuf;

use asq_models::IntModel;

use crate::common::Error;

/// Options of `asq inspect`.
#[derive(clap::Args)]
pub struct InspectArgs {
    /// A `.asqm` model file.
    model: PathBuf,
}

/// `asq inspect`: what a model file holds, node by node.
pub fn inspect(args: &InspectArgs) -> Result<(), Error> {
    use asq_models::engine::{Act, Op};
    let model = IntModel::load(&args.model)?;
    let spec = model.spec();
    let size = std::fs::metadata(&args.model)
        .map_err(|e| format!("{}: {e}", args.model.display()))?
        .len();
    let inp = &spec.input;
    println!(
        "{}: {} ({size} bytes), input {}x{}x{}, {} classes, {} nodes, {} bytes of packed weights",
        args.model.display(),
        spec.name,
        inp.channels,
        inp.height,
        inp.width,
        spec.classes,
        spec.nodes.len(),
        model.weight_bytes()
    );
    let meta: Vec<String> = spec.meta.iter().map(|(k, v)| format!("{k}={v}")).collect();
    if !meta.is_empty() {
        println!("metadata: {}", meta.join(" "));
    }
    println!();
    println!("| # | op | reads | output HxWxC | weights | input quantization | activation |");
    println!("|---|---|---|---|---|---|---|");
    for (i, node) in spec.nodes.iter().enumerate() {
        let [h, w, c] = model.shape(i + 1).expect("validated");
        let weights = model.weights(i).map_or(String::new(), |pw| {
            let form = match pw.form() {
                asq_kernels::WeightForm::Int8 { .. } => "int8 table",
                asq_kernels::WeightForm::PostExact { .. } => "exact POST (even/odd)",
            };
            format!(
                "{}x{}, {}-bit codes, {form}",
                pw.rows(),
                pw.cols(),
                pw.bits().get()
            )
        });
        let quant = |q: &asq_models::engine::InputQuant| {
            format!(
                "{} {}-bit {}, s = {:.4}",
                if q.adapter.is_some() { "ASQ" } else { "LSQ" },
                q.bits,
                if q.signed { "signed" } else { "unsigned" },
                q.step
            )
        };
        let act = |a: &Act| match a {
            Act::None => "",
            Act::Relu => "ReLU",
            Act::Relu6 => "ReLU6",
        };
        let (op, q, a) = match &node.op {
            Op::Conv {
                kernel: (kh, kw),
                stride,
                pad,
                depthwise,
                quant: qz,
                residual,
                act: ac,
                ..
            } => (
                format!(
                    "{}conv {kh}x{kw} s{stride} p{pad}{}",
                    if *depthwise { "depthwise " } else { "" },
                    residual.map_or(String::new(), |r| format!(" + value {r}"))
                ),
                quant(qz),
                act(ac),
            ),
            Op::Linear {
                quant: qz, act: ac, ..
            } => ("linear".into(), quant(qz), act(ac)),
            Op::MaxPool { size, stride } => {
                (format!("max pool {size} s{stride}"), String::new(), "")
            }
            Op::MaxPoolPadded { size, stride, pad } => (
                format!("max pool {size} s{stride} pad {pad}"),
                String::new(),
                "",
            ),
            Op::GlobalAvgPool => ("global average pool".into(), String::new(), ""),
        };
        println!(
            "| {} | {op} | {} | {h}x{w}x{c} | {weights} | {q} | {a} |",
            i + 1,
            node.input
        );
    }
    Ok(())
}
