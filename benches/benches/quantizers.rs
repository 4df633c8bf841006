//! Quantizer throughput on 1M elements, reported in elements/s: fake-quant, encode, backward
//! and bit packing, for every quantizer family.

#![allow(missing_docs)] // criterion_group! generates undocumented functions

use asq_core::pack::{pack_codes, packed_len, unpack_codes};
use asq_core::quant::asq::Asq;
use asq_core::quant::lsq::Lsq;
use asq_core::quant::uniform::Uniform;
use asq_core::quant::weights::LevelQuantizer;
use asq_core::{BitWidth, LevelSet, QuantRange};
use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

const N: usize = 1 << 20;
/// Rows of the benched tensors: 256 channels (weights) or 256 samples (ASQ activations).
const ROWS: usize = 256;

fn data(n: usize) -> Vec<f32> {
    // A deterministic bell-ish distribution: sum of two uniforms.
    let mut s = 0x2545_f491_4f6c_dd1du64;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let a = (s >> 40) as f32 / (1u64 << 24) as f32;
            let b = (s & 0xff_ffff) as f32 / (1u64 << 24) as f32;
            a + b - 1.0
        })
        .collect()
}

fn level_sets() -> Vec<(&'static str, LevelSet)> {
    let b = |n| BitWidth::new(n).unwrap();
    vec![
        ("pot-w4", LevelSet::pot(b(4)).unwrap()),
        ("apot-w4", LevelSet::apot(b(4)).unwrap()),
        ("post-w4", LevelSet::post(b(4)).unwrap()),
        ("post-int64-w4", LevelSet::post_int(b(4), 64).unwrap()),
        ("post-w8", LevelSet::post(b(8)).unwrap()),
    ]
}

fn fake_quant(c: &mut Criterion) {
    let x = data(N);
    let mut out = vec![0.0f32; N];
    let mut g = c.benchmark_group("fake_quant");
    g.throughput(Throughput::Elements(N as u64));
    let a8 = Lsq::new(QuantRange::unsigned(8).unwrap());
    g.bench_function("lsq-a8-per-tensor", |bch| {
        bch.iter(|| a8.fake_quant(black_box(&x), &[0.01], &mut out).unwrap())
    });
    let w4 = Lsq::new(QuantRange::signed(4).unwrap());
    let steps = vec![0.1f32; ROWS];
    g.bench_function("lsq-w4-per-channel", |bch| {
        bch.iter(|| w4.fake_quant(black_box(&x), &steps, &mut out).unwrap())
    });
    let asq = Asq::new(QuantRange::unsigned(4).unwrap());
    let betas: Vec<f32> = (0..ROWS).map(|i| 0.5 + i as f32 / ROWS as f32).collect();
    g.bench_function("asq-a4-per-sample", |bch| {
        bch.iter(|| {
            asq.fake_quant(black_box(&x), 0.1, &betas, &mut out)
                .unwrap()
        })
    });
    let u = Uniform::affine(&x, 8).unwrap();
    g.bench_function("uniform-affine-8", |bch| {
        bch.iter(|| u.fake_quant(black_box(&x), &mut out).unwrap())
    });
    let alphas = vec![0.9f32; ROWS];
    for (name, l) in level_sets() {
        let q = LevelQuantizer::new(l);
        g.bench_function(name, |bch| {
            bch.iter(|| q.fake_quant(black_box(&x), &alphas, &mut out).unwrap())
        });
    }
    g.finish();
}

fn encode(c: &mut Criterion) {
    let x = data(N);
    let mut codes = vec![0u8; N];
    let mut g = c.benchmark_group("encode");
    g.throughput(Throughput::Elements(N as u64));
    let a8 = Lsq::new(QuantRange::unsigned(8).unwrap());
    g.bench_function("lsq-a8", |bch| {
        bch.iter(|| a8.encode(black_box(&x), &[0.01], &mut codes).unwrap())
    });
    let alphas = vec![0.9f32; ROWS];
    for (name, l) in level_sets() {
        let q = LevelQuantizer::new(l);
        g.bench_function(name, |bch| {
            bch.iter(|| q.encode(black_box(&x), &alphas, &mut codes).unwrap())
        });
    }
    g.finish();
}

fn backward(c: &mut Criterion) {
    let x = data(N);
    let go = data(N);
    let mut dx = vec![0.0f32; N];
    let mut g = c.benchmark_group("backward");
    g.throughput(Throughput::Elements(N as u64));
    let a4 = Lsq::new(QuantRange::unsigned(4).unwrap());
    let mut ds = [0.0f32];
    g.bench_function("lsq-a4", |bch| {
        bch.iter(|| {
            a4.backward(black_box(&x), &[0.1], &go, 0.01, &mut dx, &mut ds)
                .unwrap()
        })
    });
    let asq = Asq::new(QuantRange::unsigned(4).unwrap());
    let betas: Vec<f32> = (0..ROWS).map(|i| 0.5 + i as f32 / ROWS as f32).collect();
    let mut db = vec![0.0f32; ROWS];
    g.bench_function("asq-a4", |bch| {
        bch.iter(|| {
            asq.backward(black_box(&x), 0.1, &betas, &go, 0.01, &mut dx, &mut db)
                .unwrap()
        })
    });
    let post = LevelQuantizer::new(LevelSet::post(BitWidth::new(4).unwrap()).unwrap());
    let alphas = vec![0.9f32; ROWS];
    let mut da = vec![0.0f32; ROWS];
    g.bench_function("post-w4", |bch| {
        bch.iter(|| {
            post.backward(black_box(&x), &alphas, &go, 0.01, &mut dx, &mut da)
                .unwrap()
        })
    });
    g.finish();
}

fn packing(c: &mut Criterion) {
    let mut g = c.benchmark_group("pack");
    g.throughput(Throughput::Elements(N as u64));
    for b in [2u32, 3, 4, 8] {
        let bits = BitWidth::new(b).unwrap();
        let codes: Vec<u8> = (0..N)
            .map(|i| ((i * 2_654_435_761usize) >> 7) as u8 & bits.mask())
            .collect();
        let mut packed = vec![0u8; packed_len(N, bits)];
        let mut back = vec![0u8; N];
        g.bench_with_input(BenchmarkId::new("pack", b), &b, |bch, _| {
            bch.iter(|| pack_codes(black_box(&codes), bits, &mut packed).unwrap())
        });
        pack_codes(&codes, bits, &mut packed).unwrap();
        g.bench_with_input(BenchmarkId::new("unpack", b), &b, |bch, _| {
            bch.iter(|| unpack_codes(black_box(&packed), bits, &mut back).unwrap())
        });
    }
    g.finish();
}

criterion_group!(benches, fake_quant, encode, backward, packing);
criterion_main!(benches);
