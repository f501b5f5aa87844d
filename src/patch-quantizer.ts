/**
 * Interim visual tokenizer until the dVAE lands: each patch's token is its quantised mean
 * brightness and contrast (levels x levels ids). Deterministic, no training, cheap; it gives
 * MIM a real but simple target on grayscale or RGB images in [0, 1].
 */
export class PatchQuantizer {
  readonly vocabSize: number

  constructor(
    readonly patchSize: number,
    readonly levels = 8,
  ) {
    this.vocabSize = levels * levels
  }

  /** pixels01: [B, C, H, W] in [0, 1] -> ids [B, (H/P)*(W/P)]. */
  encode(pixels01: Float32Array, batch: number, channels: number, height: number, width: number): Int32Array {
    const p = this.patchSize
    const gh = height / p
    const gw = width / p
    const ids = new Int32Array(batch * gh * gw)
    const count = channels * p * p
    for (let b = 0; b < batch; b++) {
      for (let py = 0; py < gh; py++) {
        for (let px = 0; px < gw; px++) {
          let sum = 0
          let sumSq = 0
          for (let c = 0; c < channels; c++) {
            for (let y = 0; y < p; y++) {
              const row = ((b * channels + c) * height + py * p + y) * width + px * p
              for (let x = 0; x < p; x++) {
                const v = pixels01[row + x]
                sum += v
                sumSq += v * v
              }
            }
          }
          const mean = sum / count
          const std = Math.sqrt(Math.max(0, sumSq / count - mean * mean))
          // std of values in [0, 1] is at most 0.5.
          const meanBin = Math.min(this.levels - 1, Math.floor(mean * this.levels))
          const stdBin = Math.min(this.levels - 1, Math.floor(std * 2 * this.levels))
          ids[(b * gh + py) * gw + px] = meanBin * this.levels + stdBin
        }
      }
    }
    return ids
  }
}
