//! The dVAE tokenizer on the CPU engine: DALL-E's encoder and decoder as explicit forward and
//! backward passes over NHWC buffers allocated once per batch shape, convolutions as tiled
//! im2col GEMMs (`conv`), and the training objective of `tokenizer.rs` (Gumbel-softmax
//! relaxation, logit-Laplace or MSE reconstruction, KL to the uniform prior) with the same
//! noise draws, so both paths compute the same numbers.

use std::ops::Range;

use rayon::prelude::*;

use super::conv::{self, Nhwc};
use super::matmul_bf16::{bf16_bits, bf16_value};
use super::simd::{as_f32, as_f32_mut, multiversion, Real};
use super::{finite, kernels, sized, EngineModel, Flat};
use crate::arch::dvae::{ConvParams, DvaeParams, NetParams, Resample};
use crate::config::{DvaeConfig, Precision, ReconLoss, LOGIT_LAPLACE_EPS};
use crate::error::{Error, Result};
use crate::params::{slots_mut, Layout, ParamTable, Slot};
use crate::rng::Draws;

/// One convolution: its parameter slots and where its packed copy lives when evaluating.
#[derive(Clone, Copy)]
struct Conv {
    w: Slot,
    b: Slot,
    c_in: usize,
    c_out: usize,
    k: usize,
    /// [k*k*c_in, c_out] in `packed` (conv::pack).
    packed: Slot,
}

struct Block {
    id_path: Option<Conv>,
    res_path: [Conv; 4],
}

struct Net {
    input: Conv,
    groups: Vec<Vec<Block>>,
    output: Conv,
    resample: Resample,
    post_gain: f64,
}

/// Slots of a net's convolutions, with room in the net's packed buffer handed out in order.
struct Slots<'a> {
    layout: &'a Layout,
    packed: usize,
}

impl Slots<'_> {
    fn conv(&mut self, c: &ConvParams) -> Conv {
        let (w, b) = (self.layout.slot(c.w), self.layout.slot(c.b));
        let packed = Slot { offset: self.packed, len: w.len };
        self.packed += w.len;
        Conv { w, b, c_in: c.c_in, c_out: c.c_out, k: c.k, packed }
    }

    fn net(&mut self, p: &NetParams) -> Net {
        let input = self.conv(&p.input);
        let groups = p
            .groups
            .iter()
            .map(|g| {
                g.iter()
                    .map(|b| Block {
                        id_path: b.id_path.as_ref().map(|c| self.conv(c)),
                        res_path: b.res_path.each_ref().map(|c| self.conv(c)),
                    })
                    .collect()
            })
            .collect();
        let output = self.conv(&p.output);
        Net { input, groups, output, resample: p.resample, post_gain: p.post_gain }
    }
}

/// The activations of one block kept for the backward pass: its res path's pre-activations
/// and its output (the next block's input). A group's last block keeps no output unless it is
/// the net's last: that output feeds only the resampling, whose backward pass does not read it.
struct BlockActs<T> {
    res: [Kept<T>; 3],
    out: Kept<T>,
}

/// An activation kept for the backward pass, which reads it only as a GEMM input and for
/// ReLU's sign: in T, or, when the pass's GEMMs take bf16 inputs, as the bf16 they would round
/// it to (half the memory; PyTorch's autocast keeps its convolutions' inputs in bf16 too). The
/// backward pass expands those into a scratch buffer when it reads them.
enum Kept<T> {
    Full(Vec<T>),
    Bf16(Vec<u16>),
}

impl<T: Real> Kept<T> {
    fn new(n: usize, bf16: bool) -> Self {
        if bf16 {
            Kept::Bf16(vec![0; n])
        } else {
            Kept::Full(vec![T::ZERO; n])
        }
    }

    /// The values of a pass that computes in place (full precision).
    fn full(&self) -> &[T] {
        match self {
            Kept::Full(v) => v,
            Kept::Bf16(_) => unreachable!("bf16 activations are stored, not computed in place"),
        }
    }

    fn full_mut(&mut self) -> &mut [T] {
        match self {
            Kept::Full(v) => v,
            Kept::Bf16(_) => unreachable!("bf16 activations are stored, not computed in place"),
        }
    }

    /// Keeps `v` (the bf16 form rounds as the GEMMs' packing does: [`bf16_bits`]).
    fn store(&mut self, v: &[T]) {
        match self {
            Kept::Full(kept) => kept[..v.len()].copy_from_slice(v),
            Kept::Bf16(kept) => {
                let v = as_f32(v).expect("bf16 activations are kept by f32 passes");
                kept[..v.len()].par_chunks_mut(1 << 14).zip(v.par_chunks(1 << 14)).for_each(|(k, v)| round_rows(k, v));
            }
        }
    }

    /// The values: their own, or bf16 ones expanded into `buffer`.
    fn read<'a>(&'a self, buffer: &'a mut Vec<T>) -> &'a [T] {
        match self {
            Kept::Full(v) => v,
            Kept::Bf16(kept) => {
                let out = as_f32_mut(sized(buffer, kept.len())).expect("bf16 activations are kept by f32 passes");
                out.par_chunks_mut(1 << 14).zip(kept.par_chunks(1 << 14)).for_each(|(o, k)| expand_rows(o, k));
                &buffer[..kept.len()]
            }
        }
    }
}

multiversion! {
    fn round_rows(kept: &mut [u16], v: &[f32]) {
        for (k, &v) in kept.iter_mut().zip(v) {
            *k = bf16_bits(v) as u16;
        }
    }
}

multiversion! {
    fn expand_rows(out: &mut [f32], kept: &[u16]) {
        for (o, &k) in out.iter_mut().zip(kept) {
            *o = bf16_value(k as u32);
        }
    }
}

impl<T> Default for Kept<T> {
    fn default() -> Self {
        Kept::Full(Vec::new())
    }
}

/// The activation shapes of a net for one input shape.
struct Plan {
    /// The shape at each group (channels: the group's input width).
    groups: Vec<Nhwc>,
    /// The largest activation, in values.
    largest: usize,
    /// The largest res-path activation (a quarter of its block's width in DALL-E's layout).
    largest_res: usize,
}

/// Buffer sizes of an evaluation over a range of groups (see [`Net::eval_sizes`]).
struct EvalSizes {
    input: usize,
    maps: usize,
    res: usize,
    branch: usize,
    output: usize,
}

impl EvalSizes {
    /// Values of its buffers: the maps and the res path alternate between two each.
    fn total(&self) -> usize {
        self.input + 2 * self.maps + 2 * self.res + self.branch + self.output
    }
}

/// Groups an evaluation runs over chunks of `images` images at a time.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stage {
    groups: Range<usize>,
    images: usize,
}

/// An evaluation's plan (see [`Net::eval_staging`]): the images it takes at once, its stages.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Staging {
    images: usize,
    stages: Vec<Stage>,
}

impl Net {
    fn plan(&self, input: Nhwc) -> Plan {
        let mut s = input.with_channels(self.input.c_out);
        let mut largest = input.len().max(s.len());
        let mut largest_res = 0;
        let mut groups = Vec::new();
        for (g, group) in self.groups.iter().enumerate() {
            groups.push(s);
            for b in group {
                for c in &b.res_path {
                    largest = largest.max(s.pixels() * c.c_out);
                }
                for c in &b.res_path[..3] {
                    largest_res = largest_res.max(s.pixels() * c.c_out);
                }
            }
            s = s.with_channels(group[0].res_path[3].c_out);
            if g + 1 < self.groups.len() {
                s = match self.resample {
                    Resample::MaxPool => Nhwc { h: s.h / 2, w: s.w / 2, ..s },
                    Resample::Upsample => Nhwc { h: s.h * 2, w: s.w * 2, ..s },
                };
                largest = largest.max(s.len());
            }
        }
        largest = largest.max(s.pixels() * self.output.c_out);
        Plan { groups, largest, largest_res }
    }

    /// Values an evaluation of `groups` needs for an input shape (`b`: the images run at once):
    /// its input (the net's, or the first group's), each map buffer (the widest block input or
    /// output), each res-path buffer, a block's branch, and its output (the net's, or the next
    /// group's input).
    fn eval_sizes(&self, input: Nhwc, groups: Range<usize>) -> EvalSizes {
        let plan = self.plan(input);
        let first = plan.groups[groups.start];
        let mut sizes = EvalSizes {
            input: if groups.start == 0 { input.len() } else { first.len() },
            maps: first.len(),
            res: 0,
            branch: 0,
            output: match plan.groups.get(groups.end) {
                Some(next) => next.len(),
                None => plan.groups.last().expect("a net has groups").pixels() * self.output.c_out,
            },
        };
        for g in groups {
            let s = plan.groups[g];
            for b in &self.groups[g] {
                let res = b.res_path[..3].iter().map(|c| s.pixels() * c.c_out).max().unwrap_or(0);
                let out = s.pixels() * b.res_path[3].c_out;
                sizes.res = sizes.res.max(res);
                sizes.maps = sizes.maps.max(out);
                sizes.branch = sizes.branch.max(out);
            }
            if let Some(next) = plan.groups.get(g + 1) {
                sizes.maps = sizes.maps.max(next.len());
            }
        }
        sizes
    }

    /// How an evaluation of `input.b` images runs within `budget` values of buffers: the
    /// groups over chunks of as many images as their buffers allow (the early, large maps of an
    /// encoder a few at a time, its late narrow ones all at once, so that their GEMMs are full
    /// and each Winograd kernel is transformed once), consecutive groups with the same chunk as
    /// one [`Stage`]. Between stages the images' maps wait in a buffer, which bounds the images
    /// one evaluation takes (`Staging::images`) too.
    fn eval_staging(&self, input: Nhwc, budget: usize) -> Staging {
        let one = Nhwc { b: 1, ..input };
        let shapes = self.plan(one).groups;
        let per_image = |g: usize| self.eval_sizes(one, g..g + 1).total();
        let chunks: Vec<usize> = (0..shapes.len()).map(|g| (budget / per_image(g)).clamp(1, input.b)).collect();
        let between = shapes[1..].iter().map(Nhwc::len).max().unwrap_or(0);
        let most = chunks.iter().copied().max().unwrap_or(1);
        let images = if between == 0 { most } else { most.min((budget / (2 * between)).max(1)) };
        let mut stages: Vec<Stage> = Vec::new();
        for (g, &chunk) in chunks.iter().enumerate() {
            let chunk = chunk.min(images);
            // Groups join the stage before when they take as many images and still fit together
            // (a stage's buffers are as large as its largest map, res path and output).
            let joins = |last: &Stage| {
                last.images == chunk
                    && (chunk == 1 || chunk * self.eval_sizes(one, last.groups.start..g + 1).total() <= budget)
            };
            match stages.last_mut() {
                Some(last) if joins(last) => last.groups.end = g + 1,
                _ => stages.push(Stage { groups: g..g + 1, images: chunk }),
            }
        }
        Staging { images, stages }
    }

    /// The output shape for an input shape.
    fn output_shape(&self, input: Nhwc) -> Nhwc {
        let last = *self.plan(input).groups.last().expect("a net has groups");
        last.with_channels(self.output.c_out)
    }
}

/// One net's activations for one batch shape.
struct NetActs<T> {
    /// Whether the activations are kept in bf16 (see [`Kept`]).
    bf16: bool,
    /// The input conv's output: the first block's input.
    first: Kept<T>,
    blocks: Vec<Vec<BlockActs<T>>>,
    /// Each group's resampled output but the last's: the next group's input.
    resampled: Vec<Kept<T>>,
    /// Where each pooled value came from (max pooling only; see `conv::max_pool2_argmax`).
    argmax: Vec<Vec<u8>>,
    output: Vec<T>,
    shapes: Vec<Nhwc>,
}

/// The values of a net's kept activations for one input shape: the input conv's output, each
/// block's res path and output (0: not kept), each resampled map.
struct KeptSizes {
    first: usize,
    blocks: Vec<Vec<[usize; 4]>>,
    resampled: Vec<usize>,
}

impl KeptSizes {
    fn new(net: &Net, shapes: &[Nhwc]) -> Self {
        let blocks = net
            .groups
            .iter()
            .zip(shapes)
            .enumerate()
            .map(|(g, (group, s))| {
                let sizes = |(b, block): (usize, &Block)| {
                    let [r0, r1, r2, out] = block.res_path.each_ref().map(|c| s.pixels() * c.c_out);
                    [r0, r1, r2, if keeps_output(net, g, b) { out } else { 0 }]
                };
                group.iter().enumerate().map(sizes).collect()
            })
            .collect();
        let resampled = shapes[1..].iter().zip(&net.groups).map(|(s, prev)| s.pixels() * prev[0].res_path[3].c_out);
        Self { first: shapes[0].len(), blocks, resampled: resampled.collect() }
    }

    fn total(&self) -> usize {
        self.first + self.blocks.iter().flatten().flatten().sum::<usize>() + self.resampled.iter().sum::<usize>()
    }
}

impl<T: Real> NetActs<T> {
    fn new(net: &Net, input: Nhwc, bf16: bool) -> Self {
        let z = |n: usize| Kept::new(n, bf16);
        let shapes = net.plan(input).groups;
        let sizes = KeptSizes::new(net, &shapes);
        let blocks = (sizes.blocks.iter())
            .map(|group| {
                group.iter().map(|&[r0, r1, r2, out]| BlockActs { res: [r0, r1, r2].map(z), out: z(out) }).collect()
            })
            .collect();
        let resampled: Vec<Kept<T>> = sizes.resampled.iter().map(|&n| z(n)).collect();
        let argmax = match net.resample {
            Resample::MaxPool => sizes.resampled.iter().map(|&n| vec![0u8; n]).collect(),
            Resample::Upsample => Vec::new(),
        };
        let output = vec![T::ZERO; shapes.last().expect("a net has groups").pixels() * net.output.c_out];
        Self { bf16, first: z(sizes.first), blocks, resampled, argmax, output, shapes }
    }

    /// The input of block `b` of group `g`.
    fn block_input(&self, g: usize, b: usize) -> &Kept<T> {
        match (g, b) {
            (0, 0) => &self.first,
            (g, 0) => &self.resampled[g - 1],
            (g, b) => &self.blocks[g][b - 1].out,
        }
    }

    fn last(&self) -> &Kept<T> {
        &self.blocks.last().and_then(|g| g.last()).expect("a net has blocks").out
    }
}

/// Whether a training pass keeps block `b` of group `g`'s output (see [`BlockActs`]).
fn keeps_output(net: &Net, g: usize, b: usize) -> bool {
    b + 1 < net.groups[g].len() || g + 1 == net.groups.len()
}

impl<T> Default for BlockActs<T> {
    fn default() -> Self {
        Self { res: Default::default(), out: Default::default() }
    }
}

/// The buffers of [`Pass::forward_rolling`]: block inputs and outputs alternate between `maps`,
/// the res path between `res`.
struct Rolling<'b, T> {
    maps: [&'b mut [T]; 2],
    res: [&'b mut [T]; 2],
    branch: &'b mut [T],
}

/// One net's buffers for an evaluation pass (encode, decode), which keeps no activation for a
/// backward pass: block inputs and outputs alternate between two buffers and the res path
/// between two, so a chunk of images holds about five of its largest activations instead of
/// every layer's (at 112 px, DALL-E's encoder needs 13M values an image instead of 30M); each
/// stage of groups (see [`Net::eval_staging`]) runs over its own chunk of images in them.
struct EvalActs<T> {
    staging: Staging,
    /// The first stage's input: the mapped images or one-hot codes of one chunk.
    input: Vec<T>,
    maps: [Vec<T>; 2],
    res: [Vec<T>; 2],
    branch: Vec<T>,
    /// The maps between stages: stage k writes `between[k % 2]` and reads the other.
    between: [Vec<T>; 2],
    /// The net's output for `staging.images` images.
    output: Vec<T>,
}

impl<T: Real> EvalActs<T> {
    fn new(net: &Net, input: Nhwc, budget: usize) -> Self {
        let staging = net.eval_staging(input, budget);
        let one = Nhwc { b: 1, ..input };
        let z = |n: usize| vec![T::ZERO; n];
        let (mut maps, mut res, mut branch, mut between) = (0, 0, 0, [0, 0]);
        let last = staging.stages.len() - 1;
        for (k, stage) in staging.stages.iter().enumerate() {
            let sizes = net.eval_sizes(one, stage.groups.clone());
            maps = maps.max(stage.images * sizes.maps);
            res = res.max(stage.images * sizes.res);
            branch = branch.max(stage.images * sizes.branch);
            if k < last {
                between[k % 2] = between[k % 2].max(staging.images * sizes.output);
            }
        }
        let first = net.eval_sizes(one, staging.stages[0].groups.clone()).input;
        let output = net.eval_sizes(one, staging.stages[last].groups.clone()).output;
        Self {
            input: z(staging.stages[0].images * first),
            maps: [z(maps), z(maps)],
            res: [z(res), z(res)],
            branch: z(branch),
            between: between.map(z),
            output: z(staging.images * output),
            staging,
        }
    }
}

/// Scratch shared by the passes: im2col tiles, partial sums, a block's res-path output when
/// evaluating (training keeps it in `grads[0]`), the buffers of the backward pass (gradients)
/// and, when training, one convolution's kernel: packed for its forward pass or flipped for its
/// data gradient, when needed rather than kept for the whole net (each is read once a step,
/// and DALL-E's would be 390 MB packed and 276 MB flipped).
struct Scratch<T> {
    cols: Vec<T>,
    partial: Vec<T>,
    grads: [Vec<T>; 4],
    dweight: Vec<T>,
    kernel: Vec<T>,
    /// Training in bf16: a bf16-kept activation expanded for the backward pass (and during the
    /// forward pass, the res path's second buffer).
    expanded: Vec<T>,
}

/// The two nets.
enum Part {
    Encoder,
    Decoder,
}

/// What a workspace is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Train,
    Encode,
    Decode,
}

struct Workspace<T> {
    input: Nhwc,
    /// Training: the mapped images.
    x: Vec<T>,
    /// Training: every activation of both nets.
    encoder: Option<NetActs<T>>,
    decoder: Option<NetActs<T>>,
    /// Encoding or decoding: that net's evaluation buffers.
    eval: Option<EvalActs<T>>,
    /// Training only: the relaxed codes (the decoder's input; the logits' gradient after
    /// [`relaxation_backward`]), and the gradients at the two ends of the decoder.
    soft: Vec<T>,
    dout: Vec<T>,
    dsoft: Vec<T>,
    scratch: Scratch<T>,
}

/// Metrics of one training step.
#[derive(Debug, Clone, Copy)]
pub struct DvaeLoss {
    pub loss: f64,
    pub recon: f64,
    pub kl: f64,
}

/// The weights one pass reads: raw, and packed for the GEMMs.
struct Pass<'a, T> {
    precision: Precision,
    params: &'a [T],
    /// Every convolution packed (evaluation: packed once for all chunks of images), or none:
    /// a training pass runs each convolution forward once, so it packs each kernel just before
    /// (into [`Scratch::kernel`]) instead of keeping a packed copy of all the weights.
    packed: Option<&'a [T]>,
}

impl<T: Real> Pass<'_, T> {
    #[allow(clippy::too_many_arguments)]
    fn conv(&self, c: &Conv, x: &[T], s: Nhwc, relu: bool, y: &mut [T], cols: &mut Vec<T>, kernel: &mut Vec<T>) {
        let packed: &[T] = match self.packed {
            Some(all) => c.packed.of(all),
            None => {
                let kernel = sized(kernel, c.w.len);
                conv::pack(c.w.of(self.params), c.c_out, c.c_in, c.k, kernel);
                kernel
            }
        };
        conv::forward(self.precision, x, s.with_channels(c.c_in), relu, c.k, packed, c.b.of(self.params), y, cols);
    }

    /// Forward through `net` from `input` of shape `s`, keeping the activations in `acts`.
    fn forward(&self, net: &Net, input: &[T], s: Nhwc, acts: &mut NetActs<T>, scratch: &mut Scratch<T>) {
        let mut output = std::mem::take(&mut acts.output);
        if acts.bf16 {
            // Computed in f32 in the gradient buffers (free until the backward pass) and the
            // expansion buffer (as large as any kept activation), and kept in bf16 as they are made.
            let Scratch { cols, grads: [g0, g1, g2, g3], kernel, expanded, .. } = scratch;
            let bufs = Rolling { maps: [g1, g2], res: [g3, expanded], branch: g0 };
            self.forward_rolling(net, input, s, 0..net.groups.len(), bufs, &mut output, cols, kernel, Some(acts));
        } else {
            self.forward_in_place(net, input, s, acts, &mut output, scratch);
        }
        acts.output = output;
    }

    /// [`Self::forward`] into full-precision activations, each computed where it is kept.
    fn forward_in_place(
        &self,
        net: &Net,
        input: &[T],
        s: Nhwc,
        acts: &mut NetActs<T>,
        output: &mut [T],
        scratch: &mut Scratch<T>,
    ) {
        // The gradient buffers are free until the backward pass: g0 holds a block's branch, g1
        // the output of a group's last block until it is resampled.
        let Scratch { cols, grads: [g0, g1, ..], kernel, .. } = scratch;
        self.conv(&net.input, input, s, false, acts.first.full_mut(), cols, kernel);
        let gain = T::from_f64(net.post_gain);
        for g in 0..net.groups.len() {
            let sg = acts.shapes[g];
            for (b, block) in net.groups[g].iter().enumerate() {
                // The block writes its own buffers; its input is an earlier one.
                let mut current = std::mem::take(&mut acts.blocks[g][b]);
                let x = acts.block_input(g, b).full();
                let [r0, r1, r2, r3] = &block.res_path;
                let n_out = sg.pixels() * r3.c_out;
                let [a0, a1, a2] = &mut current.res;
                self.conv(r0, x, sg, true, a0.full_mut(), cols, kernel);
                self.conv(r1, a0.full(), sg, true, a1.full_mut(), cols, kernel);
                self.conv(r2, a1.full(), sg, true, a2.full_mut(), cols, kernel);
                let branch = &mut g0[..n_out];
                self.conv(r3, a2.full(), sg, true, branch, cols, kernel);
                let out = if keeps_output(net, g, b) { current.out.full_mut() } else { &mut g1[..n_out] };
                match &block.id_path {
                    Some(id) => self.conv(id, x, sg, false, out, cols, kernel),
                    None => out.copy_from_slice(x),
                }
                add_scaled(out, branch, gain);
                acts.blocks[g][b] = current;
            }
            if g + 1 < net.groups.len() {
                let s_out = sg.with_channels(net.groups[g][0].res_path[3].c_out);
                let (last, y) = (&g1[..s_out.len()], acts.resampled[g].full_mut());
                match net.resample {
                    Resample::MaxPool => conv::max_pool2_argmax(last, s_out, y, &mut acts.argmax[g]),
                    Resample::Upsample => conv::upsample2(last, s_out, y),
                }
            }
        }
        let s_last = *acts.shapes.last().expect("groups");
        self.conv(&net.output, acts.last().full(), s_last, true, output, cols, kernel);
    }

    /// [`Self::forward`] without keeping activations, over `s.b` images (at most
    /// `acts.staging.images`) stage by stage: `fill` writes the net's input for a range of them,
    /// and the output is left in `acts.output`.
    fn forward_eval(
        &self,
        net: &Net,
        s: Nhwc,
        fill: &mut dyn FnMut(Range<usize>, &mut [T]),
        acts: &mut EvalActs<T>,
        scratch: &mut Scratch<T>,
    ) {
        let EvalActs { staging, input, maps: [x, y], res: [a, b], branch, between, output } = acts;
        let Scratch { cols, kernel, .. } = scratch;
        let one = Nhwc { b: 1, ..s };
        let last = staging.stages.len() - 1;
        for (k, stage) in staging.stages.iter().enumerate() {
            let EvalSizes { input: per_in, output: per_out, .. } = net.eval_sizes(one, stage.groups.clone());
            let [even, odd] = between;
            let (from, to) = if k % 2 == 0 { (&*odd, even) } else { (&*even, odd) };
            for i in (0..s.b).step_by(stage.images) {
                let n = stage.images.min(s.b - i);
                let src = match k {
                    0 => {
                        fill(i..i + n, &mut input[..n * per_in]);
                        &input[..n * per_in]
                    }
                    _ => &from[i * per_in..(i + n) * per_in],
                };
                let dst = if k == last { &mut output[..] } else { &mut to[..] };
                let bufs = Rolling { maps: [x, y], res: [a, b], branch };
                let out = &mut dst[i * per_out..(i + n) * per_out];
                self.forward_rolling(net, src, Nhwc { b: n, ..s }, stage.groups.clone(), bufs, out, cols, kernel, None);
            }
        }
    }

    /// Forward through `groups` of `net` over rolling buffers into `output`: from the net's
    /// input of shape `s` (when `groups` starts at the first group) or the first group's input,
    /// into the net's output (when `groups` ends at the last group) or the next group's input.
    /// Each activation is stored in `keep` when given (a training pass that keeps them in bf16,
    /// over every group), else none is kept (an evaluation).
    #[allow(clippy::too_many_arguments)]
    fn forward_rolling(
        &self,
        net: &Net,
        input: &[T],
        s: Nhwc,
        groups: Range<usize>,
        bufs: Rolling<'_, T>,
        output: &mut [T],
        cols: &mut Vec<T>,
        kernel: &mut Vec<T>,
        mut keep: Option<&mut NetActs<T>>,
    ) {
        let shapes = net.plan(s).groups;
        let Rolling { maps: [mut x, mut y], res: [a, b], branch } = bufs;
        let first = shapes[groups.start].len();
        if groups.start == 0 {
            self.conv(&net.input, input, s, false, &mut x[..first], cols, kernel);
        } else {
            x[..first].copy_from_slice(input);
        }
        if let Some(acts) = keep.as_deref_mut() {
            acts.first.store(&x[..first]);
        }
        let gain = T::from_f64(net.post_gain);
        let end = groups.end;
        for g in groups {
            let sg = shapes[g];
            for (bi, block) in net.groups[g].iter().enumerate() {
                let [r0, r1, r2, r3] = &block.res_path;
                let px = sg.pixels();
                let x_in = &x[..px * r0.c_in];
                let (n0, n1, n2) = (px * r0.c_out, px * r1.c_out, px * r2.c_out);
                self.conv(r0, x_in, sg, true, &mut a[..n0], cols, kernel);
                if let Some(acts) = keep.as_deref_mut() {
                    acts.blocks[g][bi].res[0].store(&a[..n0]);
                }
                self.conv(r1, &a[..n0], sg, true, &mut b[..n1], cols, kernel);
                if let Some(acts) = keep.as_deref_mut() {
                    acts.blocks[g][bi].res[1].store(&b[..n1]);
                }
                self.conv(r2, &b[..n1], sg, true, &mut a[..n2], cols, kernel);
                if let Some(acts) = keep.as_deref_mut() {
                    acts.blocks[g][bi].res[2].store(&a[..n2]);
                }
                let branch = &mut branch[..px * r3.c_out];
                self.conv(r3, &a[..n2], sg, true, branch, cols, kernel);
                let out = &mut y[..px * r3.c_out];
                match &block.id_path {
                    Some(id) => self.conv(id, x_in, sg, false, out, cols, kernel),
                    None => out.copy_from_slice(x_in),
                }
                add_scaled(out, branch, gain);
                if keeps_output(net, g, bi) {
                    if let Some(acts) = keep.as_deref_mut() {
                        acts.blocks[g][bi].out.store(out);
                    }
                }
                std::mem::swap(&mut x, &mut y);
            }
            if let Some(&next) = shapes.get(g + 1) {
                let s_out = sg.with_channels(next.c);
                // The last group of a stage resamples straight into the stage's output.
                let last = &x[..s_out.len()];
                let pooled = if g + 1 == end { &mut output[..] } else { &mut y[..next.len()] };
                match (net.resample, keep.as_deref_mut()) {
                    (Resample::MaxPool, Some(acts)) => conv::max_pool2_argmax(last, s_out, pooled, &mut acts.argmax[g]),
                    (Resample::MaxPool, None) => conv::max_pool2(last, s_out, pooled),
                    (Resample::Upsample, _) => conv::upsample2(last, s_out, pooled),
                }
                if let Some(acts) = keep.as_deref_mut() {
                    acts.resampled[g].store(pooled);
                }
                if g + 1 == end {
                    return;
                }
                std::mem::swap(&mut x, &mut y);
            }
        }
        let s_last = *shapes.last().expect("groups");
        self.conv(&net.output, &x[..s_last.pixels() * net.output.c_in], s_last, true, output, cols, kernel);
    }

    /// Backward through `net` from d output `dout`: the parameter gradients are added to
    /// `grads`, and d input written to `input_grad` when given (the encoder needs none).
    #[allow(clippy::too_many_arguments)]
    fn backward(
        &self,
        net: &Net,
        input: &[T],
        s: Nhwc,
        acts: &NetActs<T>,
        dout: &[T],
        grads: &mut [T],
        scratch: &mut Scratch<T>,
        input_grad: Option<&mut [T]>,
    ) {
        let Scratch { cols, partial, grads: [g0, g1, g2, g3], dweight, kernel, expanded, .. } = scratch;
        let mut conv_bwd = |c: &Conv, x: &[T], s: Nhwc, relu: bool, dy: &[T], dx: Option<&mut [T]>| {
            self.conv_backward(c, x, s, relu, dy, dx, grads, cols, partial, dweight, kernel)
        };
        let s_last = *acts.shapes.last().expect("groups");
        // d output -> d (the last block's output), in g1.
        conv_bwd(&net.output, acts.last().read(expanded), s_last, true, dout, Some(g1));
        let gain = T::from_f64(net.post_gain);
        for g in (0..net.groups.len()).rev() {
            let sg = acts.shapes[g];
            if g + 1 < net.groups.len() {
                // g1: d (group g + 1's input), back through the resampling into g0.
                let s_out = sg.with_channels(net.groups[g][0].res_path[3].c_out);
                match net.resample {
                    Resample::MaxPool => conv::max_pool2_backward_at(&acts.argmax[g], s_out, g1, g0),
                    Resample::Upsample => conv::upsample2_backward(g1, s_out, g0),
                }
                std::mem::swap(g0, g1);
            }
            for (b, block) in net.groups[g].iter().enumerate().rev() {
                // g1: d (block output). The res path from d r = gain * dy, conv by conv.
                let [a0, a1, a2] = &acts.blocks[g][b].res;
                let [r0, r1, r2, r3] = &block.res_path;
                let n_out = sg.pixels() * r3.c_out;
                scale_into(&g1[..n_out], gain, &mut g2[..n_out]);
                conv_bwd(r3, a2.read(expanded), sg, true, g2, Some(g3));
                conv_bwd(r2, a1.read(expanded), sg, true, g3, Some(g2));
                conv_bwd(r1, a0.read(expanded), sg, true, g2, Some(g3));
                let x = acts.block_input(g, b).read(expanded);
                conv_bwd(r0, x, sg, true, g3, Some(g0));
                // ... plus the id path's share: d input in g0.
                let n_in = sg.pixels() * r0.c_in;
                match &block.id_path {
                    None => add_scaled(&mut g0[..n_in], &g1[..n_in], T::ONE),
                    Some(id) => {
                        conv_bwd(id, x, sg, false, g1, Some(g2));
                        add_scaled(&mut g0[..n_in], &g2[..n_in], T::ONE);
                    }
                }
                std::mem::swap(g0, g1);
            }
        }
        // g1: d (the input conv's output).
        conv_bwd(&net.input, input, s, false, g1, input_grad);
    }

    /// Parameter gradients of one convolution from dy, and d input when asked.
    #[allow(clippy::too_many_arguments)]
    fn conv_backward(
        &self,
        c: &Conv,
        x: &[T],
        s: Nhwc,
        relu: bool,
        dy: &[T],
        dx: Option<&mut [T]>,
        grads: &mut [T],
        cols: &mut Vec<T>,
        partial: &mut Vec<T>,
        dweight: &mut Vec<T>,
        kernel: &mut Vec<T>,
    ) {
        let s = s.with_channels(c.c_in);
        let [gw, gb] = slots_mut(grads, [c.w, c.b]);
        if c.k > 1 {
            dweight.resize(dweight.len().max(c.w.len), T::ZERO);
            let dw = &mut dweight[..c.w.len];
            dw.fill(T::ZERO);
            conv::backward_params(self.precision, x, s, relu, c.k, dy, dw, gb, cols, partial);
            conv::unpack_add(dw, c.c_in, c.k, gw);
        } else {
            conv::backward_params(self.precision, x, s, relu, c.k, dy, gw, gb, cols, partial);
        }
        if let Some(dx) = dx {
            let flipped: &[T] = if c.k > 1 {
                let flipped = sized(kernel, c.w.len);
                conv::flip(c.w.of(self.params), c.c_out, c.c_in, c.k, flipped);
                flipped
            } else {
                c.w.of(self.params)
            };
            conv::backward_input(self.precision, x, s, relu, c.k, flipped, c.c_out, dy, dx, cols);
        }
    }
}

pub struct DvaeEngine<T> {
    cfg: DvaeConfig,
    /// Of the convolutions' GEMM inputs when training and encoding (see `conv::forward`).
    precision: Precision,
    pub flat: Flat<T>,
    encoder: Net,
    decoder: Net,
    /// Each net's convolutions packed for an evaluation, by [`Part`].
    packed: [Vec<T>; 2],
    /// The fewest activation values a bf16 training pass keeps in bf16 (see [`Kept`]).
    bf16_kept_min: usize,
    /// The values an evaluation's buffers may hold (see [`Net::eval_staging`]).
    eval_values: usize,
    /// One workspace per kind, kept while the input shape stays.
    workspaces: [Option<Workspace<T>>; 3],
}

/// Activation values a bf16 training pass must keep for the backward pass to keep them in bf16
/// (see [`Kept`]): 256 MiB in f32.
pub const BF16_KEPT_MIN_VALUES: usize = 1 << 26;

/// Values an evaluation's buffers may hold by default (see [`Net::eval_staging`]).
pub const EVAL_VALUES: usize = 1 << 25;

impl<T: Real> DvaeEngine<T> {
    /// An engine over `params` (values in the layout of `table`, the table of `p`), its
    /// convolutions' GEMM inputs at `precision` when training and encoding. Decoding stays f32:
    /// it makes the pixels people look at, rarely, and so they do not depend on the precision.
    pub fn new(
        cfg: &DvaeConfig,
        p: &DvaeParams,
        table: ParamTable,
        params: Vec<T>,
        precision: Precision,
    ) -> Result<Self> {
        let flat = Flat::new(table, params)?;
        let net = |p| Slots { layout: &flat.layout, packed: 0 }.net(p);
        let (encoder, decoder) = (net(&p.encoder), net(&p.decoder));
        // Gradients and packed weights are allocated by the passes that need them: encoding
        // needs only the encoder's packed weights, decoding only the decoder's.
        Ok(Self {
            cfg: cfg.clone(),
            precision,
            flat,
            encoder,
            decoder,
            packed: [Vec::new(), Vec::new()],
            bf16_kept_min: BF16_KEPT_MIN_VALUES,
            eval_values: EVAL_VALUES,
            workspaces: [None, None, None],
        })
    }

    /// Keeps a bf16 training pass's activations in bf16 from `values` of them on (default
    /// [`BF16_KEPT_MIN_VALUES`]; 0: always, as tests do on tiny shapes).
    pub fn keep_bf16_activations_from(&mut self, values: usize) {
        self.bf16_kept_min = values;
        self.workspaces[Kind::Train as usize] = None;
    }

    /// The stages of the last encode and decode: each one's groups and the images it runs at once.
    pub fn evaluation_stages(&self) -> Vec<(Range<usize>, usize)> {
        let evals =
            [Kind::Encode, Kind::Decode].map(|k| self.workspaces[k as usize].as_ref().and_then(|ws| ws.eval.as_ref()));
        evals
            .into_iter()
            .flatten()
            .flat_map(|e| e.staging.stages.iter().map(|st| (st.groups.clone(), st.images)))
            .collect()
    }

    /// Bounds the buffers of `encode` and `decode` to `values` (default [`EVAL_VALUES`]; tests
    /// set a few to run every group over a chunk of its own).
    pub fn limit_evaluation_to(&mut self, values: usize) {
        self.eval_values = values;
        self.workspaces[Kind::Encode as usize] = None;
        self.workspaces[Kind::Decode as usize] = None;
    }

    /// Whether the last training pass kept its activations in bf16.
    pub fn keeps_bf16_activations(&self) -> bool {
        let train = self.workspaces[Kind::Train as usize].as_ref();
        train.and_then(|ws| ws.encoder.as_ref()).is_some_and(|acts| acts.bf16)
    }

    fn workspace(&mut self, kind: Kind, input: Nhwc) -> Workspace<T> {
        match self.workspaces[kind as usize].take() {
            Some(ws) if ws.input == input => ws,
            old => {
                drop(old); // free the old buffers before allocating the new ones
                let z = |n: usize| vec![T::ZERO; n];
                let training = kind == Kind::Train;
                let (encoder, decoder) = match kind {
                    Kind::Train => (Some(input), Some(self.encoder.output_shape(input))),
                    Kind::Encode => (Some(input), None),
                    Kind::Decode => (None, Some(input)),
                };
                let plans = [encoder.map(|s| self.encoder.plan(s)), decoder.map(|s| self.decoder.plan(s))];
                let largest = plans.iter().flatten().map(|p| p.largest).max().unwrap_or(0);
                let largest_res = plans.iter().flatten().map(|p| p.largest_res).max().unwrap_or(0);
                let t = if training { self.encoder.output_shape(input).len() } else { 0 };
                // An f32 training pass whose GEMMs take bf16 inputs keeps its activations in bf16
                // when they are many (below that, converting them costs more than it is worth:
                // 3% of the small tokenizer's step).
                let kept =
                    |net: &Net, s: Option<Nhwc>| s.map_or(0, |s| KeptSizes::new(net, &net.plan(s).groups).total());
                let bf16 = training
                    && self.precision == Precision::Bf16
                    && as_f32::<T>(&[]).is_some()
                    && kept(&self.encoder, encoder) + kept(&self.decoder, decoder) >= self.bf16_kept_min;
                let all = |net: &Net, s: Option<Nhwc>| s.filter(|_| training).map(|s| NetActs::new(net, s, bf16));
                Workspace {
                    input,
                    x: z(if training { input.len() } else { 0 }),
                    encoder: all(&self.encoder, encoder),
                    decoder: all(&self.decoder, decoder),
                    eval: match kind {
                        Kind::Train => None,
                        Kind::Encode => Some(EvalActs::new(&self.encoder, input, self.eval_values)),
                        Kind::Decode => Some(EvalActs::new(&self.decoder, input, self.eval_values)),
                    },
                    soft: z(t),
                    dout: z(if training { input.pixels() * 2 * input.c } else { 0 }),
                    dsoft: z(t),
                    scratch: Scratch {
                        cols: Vec::new(),
                        partial: Vec::new(),
                        // The backward pass's g3 holds only res-path gradients.
                        grads: if training {
                            [z(largest), z(largest), z(largest), z(largest_res)]
                        } else {
                            Default::default()
                        },
                        dweight: Vec::new(),
                        kernel: Vec::new(),
                        expanded: if bf16 { z(largest) } else { Vec::new() },
                    },
                }
            }
        }
    }

    fn put_back(&mut self, kind: Kind, ws: Workspace<T>) {
        self.workspaces[kind as usize] = Some(ws);
    }

    /// Packs the convolutions of one net from `weights` (default: the engine's) for an evaluation's
    /// GEMMs.
    fn pack(&mut self, weights: Option<&[T]>, part: Part) {
        let params = weights.unwrap_or(&self.flat.params);
        let all = convs(match part {
            Part::Encoder => &self.encoder,
            Part::Decoder => &self.decoder,
        });
        let end = all.iter().map(|c| c.packed.offset + c.packed.len).max().unwrap_or(0);
        let packed = &mut self.packed[part as usize];
        packed.resize(end, T::ZERO);
        for c in all {
            conv::pack(c.w.of(params), c.c_out, c.c_in, c.k, c.packed.of_mut(packed));
        }
    }

    fn input_shape(&self, pixels: usize, height: usize, width: usize) -> Result<Nhwc> {
        let c = self.cfg.num_channels;
        let d = self.cfg.downsample();
        let per = c * height * width;
        if height == 0
            || width == 0
            || !height.is_multiple_of(d)
            || !width.is_multiple_of(d)
            || pixels == 0
            || !pixels.is_multiple_of(per)
        {
            return Err(Error::Input(format!(
                "engine: {pixels} pixel values do not make [B, {c}, {height}, {width}] images divisible by {d}"
            )));
        }
        Ok(Nhwc { b: pixels / per, h: height, w: width, c })
    }

    /// [B, C, H, W] in [0, 1] -> NHWC, mapped to [eps, 1 - eps] as DALL-E's map_pixels.
    fn map_input(pixels: &[T], s: Nhwc, x: &mut [T]) {
        let (mul, add) = (T::from_f64(1.0 - 2.0 * LOGIT_LAPLACE_EPS), T::from_f64(LOGIT_LAPLACE_EPS));
        let hw = s.h * s.w;
        x.par_chunks_mut(hw * s.c).zip(pixels.par_chunks(hw * s.c)).for_each(|(out, img)| {
            for p in 0..hw {
                for c in 0..s.c {
                    out[p * s.c + c] = img[c * hw + p] * mul + add;
                }
            }
        });
    }

    /// Forward and backward of the tokenizer objective on [B, C, H, W] images in [0, 1]: adds
    /// the gradient of `loss_weight` x the loss to the gradient buffer, and writes the argmax
    /// code of every position to `codes`. The Gumbel noise is keyed by sample (`draws`).
    #[allow(clippy::too_many_arguments)]
    pub fn loss_and_grads(
        &mut self,
        pixels: &[T],
        height: usize,
        width: usize,
        objective: &Objective,
        draws: Draws,
        loss_weight: f64,
        codes: &mut Vec<u32>,
    ) -> Result<DvaeLoss> {
        let Objective { temperature, kl_weight, recon } = *objective;
        let s = self.input_shape(pixels.len(), height, width)?;
        let mut ws = self.workspace(Kind::Train, s);
        // A training pass packs each kernel when it needs it (see [`Pass::packed`]): the packed
        // copy of an evaluation (a reconstruction sheet between steps) is freed, not kept
        // beside the step's activations.
        self.packed = [Vec::new(), Vec::new()];
        self.flat.grads_mut();
        Self::map_input(pixels, s, &mut ws.x);
        let Workspace { x, encoder, decoder, soft, dout, dsoft, scratch, .. } = &mut ws;
        let (encoder, decoder) = (encoder.as_mut().expect("training"), decoder.as_mut().expect("training"));
        let v = self.cfg.vocab_size;
        let tokens = self.encoder.output_shape(s);
        let pass = Pass { precision: self.precision, params: &self.flat.params, packed: None };
        pass.forward(&self.encoder, x, s, encoder, scratch);
        let logits = &encoder.output;
        kernels::argmax_rows(logits, v, codes);
        // The KL's value, with the soft codes' buffer as scratch before they are computed.
        let kl = kl_to_uniform(logits, v, soft);
        // Relaxed codes: softmax((logits + Gumbel noise) / T), the noise drawn a block at a time
        // on the stack (its stream is a counter: any block of it can be drawn alone).
        let first_draw = draws.first_sample * (tokens.pixels() / s.b) * v;
        const CHUNK: usize = kernels::GUMBEL_CHUNK;
        const BLOCK: usize = 1024;
        soft.par_chunks_mut(CHUNK).zip(logits.par_chunks(CHUNK)).enumerate().for_each(|(i, (s, z))| {
            let mut noise = [0f32; BLOCK];
            for (j, (s, z)) in s.chunks_mut(BLOCK).zip(z.chunks(BLOCK)).enumerate() {
                let noise = &mut noise[..s.len()];
                kernels::gumbel_noise_serial(draws.seed, first_draw + i * CHUNK + j * BLOCK, noise);
                for ((s, &g), &z) in s.iter_mut().zip(&*noise).zip(z) {
                    *s = z + T::from_f64(g as f64);
                }
            }
        });
        let inv_t = T::from_f64(1.0 / temperature);
        soft.par_chunks_mut(v * 16).for_each(|z| kernels::softmax_rows(z, &[], v, inv_t));
        let kl_scale = kl_weight / (s.len() / tokens.pixels()) as f64;
        pass.forward(&self.decoder, soft, tokens, decoder, scratch);
        let recon_loss = reconstruction(&decoder.output, x, s.c, recon, loss_weight, dout);
        let loss = recon_loss + kl * kl_scale;
        if let Err(e) = finite(loss) {
            self.put_back(Kind::Train, ws);
            return Err(e);
        }
        let grads = &mut self.flat.grads;
        pass.backward(&self.decoder, soft, tokens, decoder, dout, grads, scratch, Some(dsoft));
        relaxation_backward(logits, v, inv_t, loss_weight * kl_scale / tokens.pixels() as f64, soft, dsoft);
        pass.backward(&self.encoder, x, s, encoder, soft, grads, scratch, None);
        self.put_back(Kind::Train, ws);
        Ok(DvaeLoss { loss, recon: recon_loss, kl })
    }

    /// Argmax token ids [B, H/d, W/d] of [B, C, H, W] images in [0, 1], with `weights` (the
    /// EMA's, say; default: the engine's).
    pub fn encode(&mut self, weights: Option<&[T]>, pixels: &[T], height: usize, width: usize) -> Result<Vec<u32>> {
        let s = self.input_shape(pixels.len(), height, width)?;
        self.pack(weights, Part::Encoder);
        let image = s.c * s.h * s.w;
        let mut out = Vec::with_capacity(s.b * s.h * s.w);
        let mut codes = Vec::new();
        let mut ws = self.workspace(Kind::Encode, s);
        let Workspace { eval, scratch, .. } = &mut ws;
        let eval = eval.as_mut().expect("encoding");
        let pass = Pass {
            precision: self.precision,
            params: weights.unwrap_or(&self.flat.params),
            packed: Some(&self.packed[Part::Encoder as usize]),
        };
        for start in (0..s.b).step_by(eval.staging.images) {
            let sc = Nhwc { b: eval.staging.images.min(s.b - start), ..s };
            let mut fill = |images: Range<usize>, x: &mut [T]| {
                let at = |i: usize| (start + i) * image;
                Self::map_input(&pixels[at(images.start)..at(images.end)], sc, x);
            };
            pass.forward_eval(&self.encoder, sc, &mut fill, eval, scratch);
            let logits = &eval.output[..self.encoder.output_shape(sc).len()];
            kernels::argmax_rows(logits, self.cfg.vocab_size, &mut codes);
            out.extend_from_slice(&codes);
        }
        self.put_back(Kind::Encode, ws);
        Ok(out)
    }

    /// Images [B, C, h*d, w*d] in [0, 1] (unmap(sigmoid(mu))) from token ids [B, h, w], with
    /// `weights` (default: the engine's). Ids must be in range (the caller checks).
    pub fn decode(&mut self, weights: Option<&[T]>, ids: &[u32], h: usize, w: usize) -> Result<Vec<T>> {
        let v = self.cfg.vocab_size;
        if h == 0 || w == 0 || ids.is_empty() || !ids.len().is_multiple_of(h * w) {
            return Err(Error::Input(format!("engine: {} ids do not make [B, {h}, {w}] grids", ids.len())));
        }
        let s = Nhwc { b: ids.len() / (h * w), h, w, c: v };
        self.pack(weights, Part::Decoder);
        let (c, d) = (self.cfg.num_channels, self.cfg.downsample());
        let (oh, ow) = (h * d, w * d);
        let mut out = vec![T::ZERO; s.b * c * oh * ow];
        let (scale, shift) = (T::from_f64(1.0 / (1.0 - 2.0 * LOGIT_LAPLACE_EPS)), T::from_f64(LOGIT_LAPLACE_EPS));
        let mut ws = self.workspace(Kind::Decode, s);
        let Workspace { eval, scratch, .. } = &mut ws;
        let eval = eval.as_mut().expect("decoding");
        let pass = Pass {
            precision: Precision::F32,
            params: weights.unwrap_or(&self.flat.params),
            packed: Some(&self.packed[Part::Decoder as usize]),
        };
        for start in (0..s.b).step_by(eval.staging.images) {
            let sc = Nhwc { b: eval.staging.images.min(s.b - start), ..s };
            let mut fill = |images: Range<usize>, x: &mut [T]| {
                x.fill(T::ZERO);
                let grids = &ids[(start + images.start) * h * w..(start + images.end) * h * w];
                for (row, &id) in x.chunks_exact_mut(v).zip(grids) {
                    row[id as usize] = T::ONE;
                }
            };
            pass.forward_eval(&self.decoder, sc, &mut fill, eval, scratch);
            // NHWC (mu, log b) -> NCHW unmap(sigmoid(mu)), clamped to [0, 1].
            let images = &mut out[start * c * oh * ow..(start + sc.b) * c * oh * ow];
            images.par_chunks_mut(c * oh * ow).zip(eval.output.par_chunks(oh * ow * 2 * c)).for_each(|(img, o)| {
                for p in 0..oh * ow {
                    for ch in 0..c {
                        let mu = o[p * 2 * c + ch];
                        let sig = T::ONE / (T::ONE + (T::ZERO - mu).exp());
                        let v = (sig - shift) * scale;
                        img[ch * oh * ow + p] = if v < T::ZERO {
                            T::ZERO
                        } else if v > T::ONE {
                            T::ONE
                        } else {
                            v
                        };
                    }
                }
            });
        }
        self.put_back(Kind::Decode, ws);
        Ok(out)
    }
}

/// The tokenizer objective's settings for one step.
#[derive(Debug, Clone, Copy)]
pub struct Objective {
    /// Gumbel-softmax temperature.
    pub temperature: f64,
    /// Weight of the KL to the uniform prior.
    pub kl_weight: f64,
    pub recon: ReconLoss,
}

impl EngineModel for DvaeEngine<f32> {
    fn flat(&self) -> &Flat<f32> {
        &self.flat
    }
    fn flat_mut(&mut self) -> &mut Flat<f32> {
        &mut self.flat
    }
    fn release_buffers(&mut self) {
        self.workspaces = [None, None, None];
    }

    fn set_precision(&mut self, precision: Precision) {
        if precision != self.precision {
            // Whether a training pass keeps its activations in bf16 is fixed when its workspace
            // is built: f32 steps must not read bf16-rounded ones.
            self.workspaces[Kind::Train as usize] = None;
        }
        self.precision = precision;
    }
}

fn convs(net: &Net) -> Vec<Conv> {
    let mut out = vec![net.input];
    for block in net.groups.iter().flatten() {
        out.extend(block.id_path);
        out.extend(block.res_path);
    }
    out.push(net.output);
    out
}

multiversion! {
    fn add_scaled_rows<T>(y: &mut [T], x: &[T], s: T) {
        for (o, &v) in y.iter_mut().zip(x) {
            *o += v * s;
        }
    }
}

/// y += s * x.
fn add_scaled<T: Real>(y: &mut [T], x: &[T], s: T) {
    y.par_chunks_mut(16384).zip(x.par_chunks(16384)).for_each(|(y, x)| add_scaled_rows(y, x, s));
}

/// y = s * x.
fn scale_into<T: Real>(x: &[T], s: T, y: &mut [T]) {
    y.par_chunks_mut(16384).zip(x.par_chunks(16384)).for_each(|(y, x)| {
        for (o, &v) in y.iter_mut().zip(x) {
            *o = v * s;
        }
    });
}

/// Mean over rows of KL(softmax(z) || uniform) = sum q z - lse + ln V, with `scratch` as
/// large as `logits`. Its gradient is [`relaxation_backward`]'s.
fn kl_to_uniform<T: Real>(logits: &[T], v: usize, scratch: &mut [T]) -> f64 {
    let total: f64 =
        scratch.par_chunks_mut(v * 16).zip(logits.par_chunks(v * 16)).map(|(q, z)| kl_rows(z, v, T::ZERO, q)).sum();
    total / (logits.len() / v) as f64 + (v as f64).ln()
}

/// d (logits + noise) = softmax'(dsoft) / T at relaxed codes `soft`, plus `kl_scale` times
/// the KL's gradient at `logits` (q (z - E_q z) per row), written over `soft` (each row's
/// codes are read before they are overwritten): a buffer of its own would be another 51 MB
/// for DALL-E's 112 px batch of 8. `dsoft` is left as softmax'(dsoft).
fn relaxation_backward<T: Real>(logits: &[T], v: usize, inv_t: T, kl_scale: f64, soft: &mut [T], dsoft: &mut [T]) {
    let gs = T::from_f64(kl_scale);
    let rows = v * 16;
    soft.par_chunks_mut(rows).zip(dsoft.par_chunks_mut(rows)).zip(logits.par_chunks(rows)).for_each(|((p, ds), z)| {
        kernels::softmax_backward_rows(p, ds, v);
        kl_rows(z, v, gs, p);
        add_scaled_rows(p, ds, inv_t);
    });
}

multiversion! {
    /// [`kl_to_uniform`] for rows of `v` logits: the sum of their (sum q z - lse); their
    /// gradient times `gs` goes to `dlogits`.
    fn kl_rows<T>(logits: &[T], v: usize, gs: T, dlogits: &mut [T]) -> f64 {
        let mut total = 0.0;
        for (d, z) in dlogits.chunks_exact_mut(v).zip(logits.chunks_exact(v)) {
            let m = super::simd::max(z);
            for (o, &zi) in d.iter_mut().zip(z) {
                *o = (zi - m).exp_v();
            }
            let sum = super::simd::sum(d);
            let inv = T::ONE / sum;
            for o in d.iter_mut() {
                *o = *o * inv;
            }
            let expected = super::simd::dot(d, z);
            for (o, &zi) in d.iter_mut().zip(z) {
                *o = *o * (zi - expected) * gs;
            }
            total += (expected - (m + sum.ln())).to_f64();
        }
        total
    }
}

/// Mean reconstruction loss per pixel value of the decoder output `out` [P, 2C] (mu, then
/// log b) against mapped pixels `x` [P, C]; its gradient times `grad_scale` goes to `dout`.
fn reconstruction<T: Real>(out: &[T], x: &[T], c: usize, kind: ReconLoss, grad_scale: f64, dout: &mut [T]) -> f64 {
    let n = x.len();
    let inv_n = T::from_f64(grad_scale / n as f64);
    let ln2 = T::from_f64(std::f64::consts::LN_2);
    dout[..out.len()]
        .par_chunks_mut(2 * c * 256)
        .zip(out.par_chunks(2 * c * 256).zip(x.par_chunks(c * 256)))
        .map(|(d, (o, x))| {
            let mut total = 0.0;
            for ((d, o), x) in d.chunks_exact_mut(2 * c).zip(o.chunks_exact(2 * c)).zip(x.chunks_exact(c)) {
                for j in 0..c {
                    let (mu, log_b, xv) = (o[j], o[c + j], x[j]);
                    match kind {
                        ReconLoss::LogitLaplace => {
                            let logit_x = xv.ln() - (T::ONE - xv).ln();
                            let u = logit_x - mu;
                            let inv_b = (T::ZERO - log_b).exp();
                            let abs = if u >= T::ZERO { u } else { T::ZERO - u };
                            total += (log_b + (xv.ln() + (T::ONE - xv).ln()) + abs * inv_b + ln2).to_f64();
                            let sign = if u >= T::ZERO { T::ONE } else { T::ZERO - T::ONE };
                            d[j] = (T::ZERO - sign) * inv_b * inv_n;
                            d[c + j] = (T::ONE - abs * inv_b) * inv_n;
                        }
                        ReconLoss::Mse => {
                            let s = T::ONE / (T::ONE + (T::ZERO - mu).exp());
                            total += ((s - xv) * (s - xv)).to_f64();
                            d[j] = T::from_f64(2.0) * (s - xv) * s * (T::ONE - s) * inv_n;
                            d[c + j] = T::ZERO;
                        }
                    }
                }
            }
            total
        })
        .sum::<f64>()
        / n as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::presets;

    /// DALL-E's nets at 112 px (14 x 14 codes) and the evaluation stages of `b` images.
    fn dall_e_stages(b: usize, budget: usize) -> [(Staging, Vec<usize>); 2] {
        let cfg = presets::dvae("dall-e").unwrap();
        let (table, p) = DvaeParams::new(&cfg);
        let layout = Layout::new(&table);
        let mut slots = Slots { layout: &layout, packed: 0 };
        let nets = [
            (slots.net(&p.encoder), Nhwc { b, h: 112, w: 112, c: 3 }),
            (slots.net(&p.decoder), Nhwc { b, h: 14, w: 14, c: cfg.vocab_size }),
        ];
        nets.map(|(net, s)| {
            let staging = net.eval_staging(s, budget);
            let one = Nhwc { b: 1, ..s };
            let values =
                staging.stages.iter().map(|st| st.images * net.eval_sizes(one, st.groups.clone()).total()).collect();
            (staging, values)
        })
    }

    #[test]
    fn evaluation_stages_run_the_narrow_groups_over_more_images() {
        let stage = |groups: Range<usize>, images| Stage { groups, images };
        let [(encoder, _), (decoder, _)] = dall_e_stages(8, EVAL_VALUES);
        // The encoder's 112 px group two images at a time, as one pass over the whole net did.
        let expected = vec![stage(0..1, 2), stage(1..2, 4), stage(2..3, 8), stage(3..4, 8)];
        assert_eq!(encoder, Staging { images: 8, stages: expected });
        // The decoder's 112 px group one image at a time: the maps between stages bound the images.
        assert_eq!(decoder, Staging { images: 2, stages: vec![stage(0..2, 2), stage(2..4, 1)] });
        for b in [1, 3, 8, 64, 256] {
            for (staging, values) in dall_e_stages(b, EVAL_VALUES) {
                assert!(staging.images <= b && staging.stages.iter().all(|st| st.images <= staging.images));
                let groups: Vec<usize> = staging.stages.iter().flat_map(|st| st.groups.clone()).collect();
                assert_eq!(groups, [0, 1, 2, 3], "{staging:?}: every group once, in order");
                for (st, v) in staging.stages.iter().zip(values) {
                    assert!(st.images == 1 || v <= EVAL_VALUES, "{staging:?}: {v} values in {st:?}");
                }
            }
        }
    }
}
