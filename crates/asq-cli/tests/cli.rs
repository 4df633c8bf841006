//! The `asq` binary end to end: the demo on a few real images, and clear errors on bad input.

use std::process::Command;

fn asq(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_asq"))
        .args(args)
        .output()
        .expect("run asq");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn demo_trains_exports_and_runs_integer_inference() {
    let dir = std::env::temp_dir().join(format!("asq-demo-{}", std::process::id()));
    let (ok, out, err) = asq(&[
        "demo",
        "--train-images",
        "256",
        "--test-images",
        "64",
        "--fp-epochs",
        "1",
        "--qat-epochs",
        "1",
        "--batch",
        "32",
        "--out",
        dir.to_str().unwrap(),
    ]);
    assert!(ok, "demo failed: {err}");
    for want in [
        "| ResNet-20 FP32 | float graph |",
        "fake-quant graph",
        "integer engine",
        "accuracy difference",
    ] {
        assert!(out.contains(want), "missing {want:?} in:\n{out}");
    }
    // The checkpoints and the model file it wrote work with the other commands.
    for name in ["resnet20-fp32.ckpt", "resnet20-asq-post-w4a4.ckpt"] {
        asq_train::checkpoint::Checkpoint::load(&dir.join(name)).expect(name);
    }
    let model = dir.join("resnet20-asq-post-w4a4.asqm");
    let (ok, out, err) = asq(&["eval", model.to_str().unwrap(), "--test-images", "64"]);
    assert!(
        ok && out.contains("resnet20 asq-post W4A4 on the integer engine"),
        "{out}{err}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn bad_input_is_a_clear_error_not_a_panic() {
    let (ok, _, err) = asq(&["demo", "--data", "/nonexistent/fashion"]);
    assert!(!ok);
    assert!(
        err.starts_with("asq: error:") && err.contains("/nonexistent/fashion"),
        "{err}"
    );
    let (ok, _, err) = asq(&[
        "demo",
        "--bits",
        "9",
        "--train-images",
        "8",
        "--test-images",
        "8",
        "--fp-epochs",
        "0",
        "--qat-epochs",
        "0",
    ]);
    assert!(!ok);
    assert!(err.contains("bit width 9"), "{err}");
    let (ok, _, err) = asq(&["bench", "kernels", "--threads", "0"]);
    assert!(!ok && err.contains("--threads"), "{err}");
    let (ok, _, err) = asq(&["frobnicate"]);
    assert!(!ok && err.contains("frobnicate"), "{err}");
}

#[test]
fn train_export_eval_on_files() {
    use asq_train::data::npy;
    let dir = std::env::temp_dir().join(format!("asq-pipeline-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = |name: &str| dir.join(name).to_str().unwrap().to_string();
    let small = [
        "--train-images",
        "512",
        "--test-images",
        "200",
        "--batch",
        "32",
    ];
    let run = |args: &[&str]| {
        let (ok, out, err) = asq(args);
        assert!(ok, "asq {args:?} failed: {err}");
        out
    };
    // Full precision, then W4A4 ASQ+POST from its weights, then one more epoch by resuming.
    let fp = p("fp.ckpt");
    let out = run(&[
        &[
            "train",
            "--model",
            "lenet5",
            "--epochs",
            "1",
            "--schedule",
            "cosine-epoch",
            "--init",
            "he",
            "--out",
            &fp,
        ],
        &small[..],
    ]
    .concat());
    assert!(
        out.contains("| epoch | loss | train accuracy | images/s |")
            && out.contains("test: 200 images"),
        "{out}"
    );
    let q = p("q.ckpt");
    let qat = [
        "train", "--model", "lenet5", "--quant", "asq-post", "--bits", "4", "--lr", "0.01",
        "--out", &q,
    ];
    let out = run(&[&qat[..], &["--epochs", "1", "--init", &fp], &small[..]].concat());
    assert!(
        out.contains("initialised") && out.contains("lenet5 asq-post W4A4"),
        "{out}"
    );
    let svg = p("curves.svg");
    let out = run(&[
        &qat[..],
        &["--epochs", "2", "--resume", "--plot", &svg],
        &small[..],
    ]
    .concat());
    let doc = std::fs::read_to_string(&svg).unwrap();
    assert!(
        doc.starts_with("<svg") && doc.matches("<polyline").count() == 4,
        "{doc}"
    );
    assert!(out.contains("resuming") && out.contains("| 2 |"), "{out}");
    let m = p("q.asqm");
    let out = run(&["export", &q, "--out", &m]);
    assert!(out.contains("7 nodes"), "{out}");
    let out = run(&["inspect", &m]);
    for want in [
        "| 1 | conv 5x5 s1 p2 | 0 | 28x28x6 |",
        "LSQ 8-bit signed",
        "| 2 | max pool 2 s2 |",
        "ASQ 4-bit unsigned",
        "| 7 | linear | 6 | 1x1x10 |",
        "quant=asq-post",
    ] {
        assert!(
            out.contains(want),
            "missing {want:?} in
{out}"
        );
    }
    // The integer engine and the fake-quant graph agree on the test accuracy.
    let acc = |out: &str| {
        out.split("accuracy ")
            .nth(1)
            .unwrap()
            .split(' ')
            .next()
            .unwrap()
            .to_string()
    };
    let int = run(&["eval", &m, "--test-images", "200", "--classes"]);
    assert!(
        int.contains("| Trouser |") && int.contains("| class | images | accuracy |"),
        "{int}"
    );
    let fq = run(&["eval", &q, "--test-images", "200"]);
    assert!(
        int.contains("integer engine") && fq.contains("fake-quant graph"),
        "{int}{fq}"
    );
    let (a, b): (f64, f64) = (acc(&int).parse().unwrap(), acc(&fq).parse().unwrap());
    assert!((a - b).abs() <= 1.0, "integer {a} % vs fake-quant {b} %");
    assert!(a > 50.0, "{int}");

    // Post-training quantization from the float model, then fine-tuning that keeps it.
    let ptq = p("ptq.ckpt");
    let out = run(&[
        "calibrate",
        &fp,
        "--quant",
        "asq-post",
        "--bits",
        "4",
        "--images",
        "64",
        "--test-images",
        "100",
        "--out",
        &ptq,
    ]);
    assert!(
        out.contains("after calibration on 64 images (PTQ)"),
        "{out}"
    );
    let out = run(&[
        &qat[..1],
        &[
            "--model",
            "lenet5",
            "--quant",
            "asq-post",
            "--init",
            &ptq,
            "--out",
            &p("ft.ckpt"),
            "--epochs",
            "1",
        ],
        &small[..],
    ]
    .concat());
    assert!(out.contains("initialised"), "{out}");

    // Calibration on a folder of the user's own images (PNG and JPEG, any size, gray or RGB).
    let imgs = dir.join("imgs");
    std::fs::create_dir_all(&imgs).unwrap();
    for i in 0..6u32 {
        let (w, h) = (40 + 3 * i, 30 + 5 * i);
        let img = image::RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([(x * 7 + i) as u8, (y * 5) as u8, ((x + y) * 3) as u8])
        });
        let ext = if i % 2 == 0 { "png" } else { "jpg" };
        img.save(imgs.join(format!("im{i}.{ext}"))).unwrap();
    }
    std::fs::write(imgs.join("notes.txt"), "not an image").unwrap();
    let out = run(&[
        "calibrate",
        &fp,
        "--images-dir",
        imgs.to_str().unwrap(),
        "--test-images",
        "100",
        "--out",
        &p("ptq2.ckpt"),
    ]);
    assert!(out.contains("after calibration on 6 images (PTQ)"), "{out}");
    std::fs::write(imgs.join("broken.png"), b"\x89PNG not really").unwrap();

    // Pictures: ASQ's beta per layer over test images, weight histograms with the levels.
    let (betas, weights) = (p("betas.svg"), p("weights.svg"));
    let out = run(&[
        "plot",
        &q,
        "--betas",
        &betas,
        "--weights",
        &weights,
        "--test-images",
        "100",
    ]);
    assert!(out.contains("| conv2 |") && out.contains("W4A4: "), "{out}");
    let doc = std::fs::read_to_string(&betas).unwrap();
    // LeNet-5's ASQ layers: conv2, fc1, fc2 (the first conv and the classifier are 8-bit LSQ).
    assert!(
        doc.starts_with("<svg") && doc.matches("ASQ beta").count() == 3,
        "{doc}"
    );
    let doc = std::fs::read_to_string(&weights).unwrap();
    assert!(
        doc.contains("POST levels (4 bits)") && doc.contains("w / alpha"),
        "{doc}"
    );

    // Logits for a NumPy array of images, on the integer engine and on the fake-quant graph.
    let images: Vec<f32> = (0..3 * 28 * 28)
        .map(|i| ((i % 97) as f32 / 48.0) - 1.0)
        .collect();
    let x = p("x.npy");
    std::fs::write(&x, npy::to_bytes_f32(&[3, 1, 28, 28], &images).unwrap()).unwrap();
    let (y_int, y_fq) = (p("y_int.npy"), p("y_fq.npy"));
    run(&["predict", &m, "--input", &x, "--out", &y_int]);
    let out = run(&["predict", &q, "--input", &x, "--out", &y_fq, "--batch", "2"]);
    assert!(out.contains("logits of 3 images x 10 classes"), "{out}");
    let read = |f: &str| npy::parse_f32(&std::fs::read(f).unwrap(), f.as_ref()).unwrap();
    let ((si, vi), (sf, vf)) = (read(&y_int), read(&y_fq));
    assert_eq!((si, sf), (vec![3, 10], vec![3, 10]));
    let scale = vf.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    assert!(
        vi.iter()
            .zip(&vf)
            .all(|(a, b)| (a - b).abs() <= 0.05 * scale),
        "{vi:?} vs {vf:?}"
    );

    // Clear errors.
    let fails = |args: &[&str], want: &str| {
        let (ok, _, err) = asq(args);
        assert!(
            !ok && err.starts_with("asq: error:") && err.contains(want),
            "{args:?}: {err}"
        );
    };
    fails(&["export", &fp, "--out", &p("x.asqm")], "full-precision");
    fails(&["plot", &fp, "--betas", &p("b2.svg")], "no quantizers");
    fails(
        &["calibrate", &q, "--out", &p("c.ckpt")],
        "already quantized",
    );
    fails(
        &["calibrate", &fp, "--quant", "fp32", "--out", &p("c.ckpt")],
        "nothing to calibrate",
    );
    std::fs::write(
        p("x3.npy"),
        npy::to_bytes_f32(&[2, 3, 4], &[0.0; 24]).unwrap(),
    )
    .unwrap();
    fails(
        &["predict", &m, "--input", &p("x3.npy"), "--out", &p("y.npy")],
        "[N, C, H, W]",
    );
    std::fs::write(
        p("x32.npy"),
        npy::to_bytes_f32(&[1, 1, 32, 32], &[0.0; 1024]).unwrap(),
    )
    .unwrap();
    fails(
        &[
            "predict",
            &q,
            "--input",
            &p("x32.npy"),
            "--out",
            &p("y.npy"),
        ],
        "1x28x28",
    );
    let mut nan = images.clone();
    nan[5] = f32::NAN;
    std::fs::write(
        p("xnan.npy"),
        npy::to_bytes_f32(&[3, 1, 28, 28], &nan).unwrap(),
    )
    .unwrap();
    fails(
        &[
            "predict",
            &m,
            "--input",
            &p("xnan.npy"),
            "--out",
            &p("y.npy"),
        ],
        "not finite",
    );
    fails(
        &["predict", &m, "--input", &m, "--out", &p("y.npy")],
        "magic",
    );
    fails(&["predict", &m, "--input", &x, "--out", &y_int], "--force");
    fails(&["plot", &q], "nothing to draw");
    fails(&["plot", &q, "--betas", &betas], "--force");
    std::fs::write(p("cut.asqm"), &std::fs::read(&m).unwrap()[..100]).unwrap();
    fails(&["eval", &p("cut.asqm")], "truncated");
    std::fs::write(
        p("junk.bin"),
        [b"not a model at all".as_slice(); 4].concat(),
    )
    .unwrap();
    fails(&["eval", &p("junk.bin")], "not an asq checkpoint");
    fails(&["eval", &p("missing.asqm")], "missing.asqm");
    fails(
        &["train", "--model", "vgg16", "--out", &p("v.ckpt")],
        "resnet20",
    );
    fails(
        &["train", "--quant", "asq-foo", "--out", &p("v.ckpt")],
        "asq-post",
    );
    fails(
        &["train", "--out", "/nonexistent-dir/x.ckpt"],
        "does not exist",
    );
    fails(&[&["train", "--out", &q], &small[..]].concat(), "--resume");
    fails(&["export", &q, "--out", &m], "--force");
    fails(&["export", &q, "--out", &p("")], "is a directory");
    fails(
        &[
            &["train", "--schedule", "linear", "--out", &p("v.ckpt")],
            &small[..],
        ]
        .concat(),
        "cosine-epoch",
    );
    for (flags, says) in [
        (&["--decay", "bias"][..], "all or weights"),
        (&["--step-grad", "batch"][..], "tensor, sample"),
        (&["--warmup", "100000"][..], "shorter than the run"),
        (&["--bits", "2"][..], "does not apply to --quant fp32"),
        (&["--quant", "lsq", "--bits", "9"][..], "9"),
        (&["--data", "/nonexistent-dir"][..], "dataset-fashion-mnist"),
    ] {
        fails(
            &[&["train", "--out", &p("v.ckpt")][..], &small[..], flags].concat(),
            says,
        );
    }
    fails(
        &[
            "train",
            "--out",
            &p("v.ckpt"),
            "--train-images",
            "20",
            "--batch",
            "32",
            "--drop-last",
        ],
        "no batch of 32",
    );
    fails(
        &[
            &[
                "train", "--model", "mlp", "--quant", "asq-post", "--out", &q, "--resume",
            ],
            &small[..],
        ]
        .concat(),
        "saved run is lenet5",
    );
    assert!(
        !dir.join("x.asqm").exists() && !dir.join("v.ckpt").exists() && !dir.join("y.npy").exists(),
        "failed commands write nothing"
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn table_trains_every_cell_once_and_resumes() {
    let dir = std::env::temp_dir().join(format!("asq-table-{}", std::process::id()));
    let args = [
        "table",
        "--out",
        dir.to_str().unwrap(),
        "--model",
        "lenet5",
        "--bits",
        "4,2",
        "--methods",
        "lsq,asq-post",
        "--fp-epochs",
        "1",
        "--qat-epochs",
        "1",
        "--train-images",
        "256",
        "--test-images",
        "100",
        "--batch",
        "64",
    ];
    let (ok, out, err) = asq(&args);
    assert!(ok, "{err}");
    let md = std::fs::read_to_string(dir.join("results.md")).unwrap();
    assert!(
        md.contains("| W/A | lsq | asq-post |") && md.contains("| 2/2 |"),
        "{md}"
    );
    assert_eq!(
        out.matches("training lenet5").count(),
        5,
        "FP32 + 4 variants: {out}"
    );
    // A second run finds every cell done and trains nothing.
    let (ok, out, _) = asq(&args);
    assert!(
        ok && !out.contains("training lenet5") && out.contains("table done"),
        "{out}"
    );
    // Full-precision first/last layers (the table's protocol) cannot be exported.
    let ckpt = dir.join("lenet5-lsq-w4a4.ckpt");
    let (ok, _, err) = asq(&["export", ckpt.to_str().unwrap(), "-o", "/tmp/never.asqm"]);
    assert!(!ok && err.contains("fp32 ends"), "{err}");
    let (ok, _, err) = asq(&[
        "table",
        "--out",
        dir.to_str().unwrap(),
        "--methods",
        "lsq,nope",
    ]);
    assert!(!ok && err.contains("nope"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn bench_models_compares_engines_in_one_run() {
    let (ok, out, err) = asq(&[
        "bench",
        "models",
        "--models",
        "lenet5",
        "--batches",
        "1,3",
        "--seconds",
        "0.05",
    ]);
    assert!(ok, "{err}");
    assert!(
        out.contains("| lenet5 | 1 |") && out.contains("| lenet5 | 3 |"),
        "{out}"
    );
    let (ok, _, err) = asq(&["bench", "models", "--models", "vgg"]);
    assert!(!ok && err.contains("vgg"), "{err}");
    // JSON lines for a one-command comparison with the peers, and the profile.
    let (ok, out, err) = asq(&[
        "bench",
        "models",
        "--models",
        "lenet5",
        "--batches",
        "2",
        "--threads",
        "1,2",
        "--seconds",
        "0.02",
        "--json",
        "--profile",
    ]);
    assert!(ok, "{err}");
    let lines: Vec<&str> = out.lines().filter(|l| l.starts_with('{')).collect();
    assert_eq!(lines.len(), 4, "{out}"); // 2 thread counts x (fp32, int)
    for key in [
        "\"model\": \"lenet5\"",
        "\"batch\": 2",
        "\"engine\": \"int\"",
        "\"isa\": ",
        "\"images_per_s\": ",
    ] {
        assert!(out.contains(key), "{key}: {out}");
    }
    assert!(
        out.contains("| node | op | quantize | im2col |") && out.contains("| all |"),
        "{out}"
    );
    let (ok, out, err) = asq(&[
        "bench",
        "train",
        "--model",
        "lenet5",
        "--quant",
        "fp32,asq-post",
        "--batch",
        "8",
        "--steps",
        "2",
        "--threads",
        "1",
        "--json",
    ]);
    assert!(ok, "{err}");
    assert_eq!(
        out.lines()
            .filter(|l| l.contains("\"images_per_s\": "))
            .count(),
        2,
        "{out}"
    );
    assert!(
        out.contains("\"quant\": \"asq-post\", \"bits\": 4"),
        "{out}"
    );
    assert!(out.contains("\"conv_precision\": \"fast\""), "{out}");
    let (ok, out, err) = asq(&[
        "--conv-precision",
        "highest",
        "bench",
        "train",
        "--model",
        "lenet5",
        "--batch",
        "4",
        "--steps",
        "1",
        "--threads",
        "1",
        "--json",
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("\"conv_precision\": \"highest\""), "{out}");
    let (ok, _, err) = asq(&["--conv-precision", "low", "info"]);
    assert!(!ok && err.contains("--conv-precision"), "{err}");
}

#[test]
fn info_names_the_kernel_variant() {
    let (ok, out, _) = asq(&["info"]);
    assert!(ok && out.contains("kernel variant in use"), "{out}");
    let (ok, out, _) = asq(&["--jobs", "1", "info"]);
    assert!(ok && out.contains("threads (rayon): 1"), "{out}");
    let (ok, _, err) = asq(&["info", "-j", "0"]);
    assert!(!ok && err.contains("--jobs 0"), "{err}");
}

/// A PyTorch ResNet-8 (safetensors, `asq-models/tests/fixtures/torch_import`) imported and run
/// with `asq predict` gives PyTorch's eval-mode logits; fine-tuned as W4A4 ASQ+POST, exported
/// back to safetensors, it imports again.
#[test]
fn pytorch_model_in_predict_quantize_and_out() {
    use asq_train::data::npy;
    let fx = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../asq-models/tests/fixtures/torch_import");
    let dir = std::env::temp_dir().join(format!("asq-torch-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = |name: &str| dir.join(name).to_str().unwrap().to_string();
    let floats = |name: &str| -> Vec<f32> {
        std::fs::read(fx.join(name))
            .unwrap()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()
    };
    let run = |args: &[&str]| {
        let (ok, out, err) = asq(args);
        assert!(ok, "asq {args:?} failed: {err}");
        out
    };
    let st = fx.join("resnet8.safetensors");
    let st = st.to_str().unwrap();
    let out = run(&["import", st, "--model", "resnet8", "--out", &p("r8.ckpt")]);
    assert!(out.contains("imported 47 tensors"), "{out}");
    std::fs::write(
        p("x.npy"),
        npy::to_bytes_f32(&[8, 1, 28, 28], &floats("images.bin")).unwrap(),
    )
    .unwrap();
    run(&[
        "predict",
        &p("r8.ckpt"),
        "--input",
        &p("x.npy"),
        "--out",
        &p("y.npy"),
    ]);
    let (shape, got) =
        npy::parse_f32(&std::fs::read(p("y.npy")).unwrap(), "y.npy".as_ref()).unwrap();
    assert_eq!(shape, [8, 10]);
    let want = floats("logits.bin");
    let d: f64 = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (*a as f64 - *b as f64).powi(2))
        .sum();
    let n: f64 = want.iter().map(|b| (*b as f64).powi(2)).sum();
    assert!((d / n).sqrt() < 1e-4, "logits {got:?} vs PyTorch {want:?}");

    // Quantize and fine-tune briefly, then out to safetensors and back in.
    run(&[
        "train",
        "--model",
        "resnet8",
        "--quant",
        "asq-post",
        "--bits",
        "4",
        "--lr",
        "0.01",
        "--init",
        &p("r8.ckpt"),
        "--train-images",
        "256",
        "--test-images",
        "100",
        "--epochs",
        "1",
        "--batch",
        "64",
        "--out",
        &p("q.ckpt"),
    ]);
    let out = run(&[
        "export-safetensors",
        &p("q.ckpt"),
        "--out",
        &p("q.safetensors"),
    ]);
    assert!(out.contains("resnet8 asq-post W4A4"), "{out}");
    let (tensors, meta) = asq_models::torch::read_safetensors(
        &std::fs::read(p("q.safetensors")).unwrap(),
        "q".as_ref(),
    )
    .unwrap();
    assert_eq!(meta.get("quant").map(String::as_str), Some("asq-post"));
    assert!(tensors.iter().any(|t| t.name == "layers.2.conv2.aq.s"));
    let out = run(&[
        "import",
        &p("q.safetensors"),
        "--model",
        "resnet8",
        "--out",
        &p("r8b.ckpt"),
    ]);
    assert!(out.contains("imported"), "{out}");
    // Hostile or mismatched input: one-line errors.
    let fails = |args: &[&str], want: &str| {
        let (ok, _, err) = asq(args);
        assert!(
            !ok && err.starts_with("asq: error:") && err.contains(want),
            "{args:?}: {err}"
        );
    };
    fails(
        &["import", st, "--model", "resnet20", "--out", &p("z.ckpt")],
        "has shape",
    );
    fails(
        &["import", st, "--model", "resnet18", "--out", &p("z.ckpt")],
        "tensor bn1.bias has shape [16], the model's stem.bn.bias is [64]",
    );
    fails(
        &[
            "import",
            st,
            "--model",
            "mobilenetv2-cifar",
            "--out",
            &p("z.ckpt"),
        ],
        "this architecture has none",
    );
    fails(
        &[
            "import",
            &p("x.npy"),
            "--model",
            "resnet8",
            "--out",
            &p("z.ckpt"),
        ],
        "not a valid safetensors",
    );
    fails(
        &["import", st, "--model", "resnet8", "--out", &p("r8.ckpt")],
        "--force",
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn cifar_directories_train_calibrate_and_evaluate() {
    // A synthetic CIFAR-10 directory in the official archive's layout: the class sets the
    // brightness of one colour channel, so a small model can learn it.
    let dir = std::env::temp_dir().join(format!("asq-cifar-cli-{}", std::process::id()));
    let bin = dir.join("cifar-10-batches-bin");
    std::fs::create_dir_all(&bin).unwrap();
    let records = |n: usize, seed: usize| -> Vec<u8> {
        let mut v = Vec::new();
        for i in 0..n {
            let label = ((i * 7 + seed) % 10) as u8;
            v.push(label);
            for ch in 0..3 {
                for px in 0..1024 {
                    let on = ch == (label as usize % 3);
                    let noise = ((i * 31 + px * 17 + seed) % 23) as u8;
                    v.push(if on { 40 + 20 * label + noise } else { noise });
                }
            }
        }
        v
    };
    std::fs::write(bin.join("data_batch_1.bin"), records(96, 1)).unwrap();
    std::fs::write(bin.join("test_batch.bin"), records(40, 2)).unwrap();
    let p = |name: &str| dir.join(name).to_str().unwrap().to_string();
    let data = dir.to_str().unwrap().to_string();
    let run = |args: &[&str]| {
        let (ok, out, err) = asq(args);
        assert!(ok, "asq {args:?} failed: {err}");
        out + &err
    };
    let fp = p("fp.ckpt");
    run(&[
        "train",
        "--model",
        "lenet5",
        "--data",
        &data,
        "--epochs",
        "1",
        "--batch",
        "16",
        "--test-images",
        "40",
        "--out",
        &fp,
    ]);
    let q = p("q.ckpt");
    let out = run(&[
        "calibrate",
        &fp,
        "--data",
        &data,
        "--quant",
        "asq-post",
        "--bits",
        "4",
        "--images",
        "32",
        "--test-images",
        "40",
        "--out",
        &q,
    ]);
    assert!(
        out.contains("after calibration on 32 images (PTQ)"),
        "{out}"
    );
    let out = run(&["eval", &q, "--data", &data, "--test-images", "40"]);
    assert!(out.contains("40"), "{out}");
    // Neither layout: a clear error naming both.
    let (ok, _, err) = asq(&[
        "eval",
        &q,
        "--data",
        bin.parent().unwrap().parent().unwrap().to_str().unwrap(),
    ]);
    assert!(
        !ok && err.contains("CIFAR-10") && err.contains("Fashion-MNIST"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).ok();
}
