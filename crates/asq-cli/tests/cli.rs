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
    // The checkpoints it wrote load back.
    for name in ["resnet20-fp32.ckpt", "resnet20-asq-post-w4a4.ckpt"] {
        asq_train::checkpoint::Checkpoint::load(&dir.join(name)).expect(name);
    }
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
fn info_names_the_kernel_variant() {
    let (ok, out, _) = asq(&["info"]);
    assert!(ok && out.contains("kernel variant in use"), "{out}");
}
