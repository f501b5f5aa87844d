/**
 * Semantic-segmentation metrics exactly as mmseg's `eval_metrics` and Hugging Face evaluate's
 * `mean_iou`: per-class intersection, union, predicted and true pixel areas accumulated over
 * the whole evaluation set (not averaged per image); pixels whose true label is the ignore index
 * dropped; a class absent from both prediction and truth has no IoU (NaN) and is left out of the
 * mean, and a class absent from the truth has no accuracy.
 */
import { Distributed, SINGLE_PROCESS, sumAcrossRanks } from '../distributed'
import { checkPositiveInteger } from '../check'

export interface SegmentationScores {
  /** Mean over the classes that have an IoU (NaN ones left out). */
  meanIou: number
  /** Mean over the classes present in the truth. */
  meanAccuracy: number
  /** Correct pixels / labelled pixels. */
  overallAccuracy: number
  /** Per class, NaN where the class is in neither prediction nor truth. */
  perClassIou: number[]
  /** Per class, NaN where the class is not in the truth. */
  perClassAccuracy: number[]
}

export interface SegmentationMetricsOptions {
  numLabels: number
  /** True labels to leave out. Default 255. */
  ignoreIndex?: number
}

export class SegmentationMetrics {
  readonly numLabels: number
  readonly ignoreIndex: number
  /** [intersection, predicted, truth] areas per class, in pixels. */
  private readonly areas: [Float64Array, Float64Array, Float64Array]

  constructor(opts: SegmentationMetricsOptions) {
    const { numLabels } = opts
    this.numLabels = checkPositiveInteger('numLabels', numLabels)
    this.ignoreIndex = opts.ignoreIndex ?? 255
    this.areas = [new Float64Array(numLabels), new Float64Array(numLabels), new Float64Array(numLabels)]
  }

  /**
   * Adds one image's (or batch's) predicted and true class ids, pixel for pixel; `what` names
   * it in errors (a file).
   */
  add(predicted: ArrayLike<number>, truth: ArrayLike<number>, what = 'the image'): void {
    if (predicted.length !== truth.length)
      throw new Error(`${what}: ${predicted.length} predicted pixels for ${truth.length} labelled ones`)
    const [intersection, predictedArea, truthArea] = this.areas
    const n = this.numLabels
    for (let i = 0; i < truth.length; i++) {
      const t = truth[i]
      if (t === this.ignoreIndex) continue
      const p = predicted[i]
      if (!(Number.isInteger(t) && t >= 0 && t < n))
        throw new Error(
          `${what}: true label ${t} at pixel ${i} is not a class id in [0, ${n - 1}] nor the ignore index ${this.ignoreIndex}`,
        )
      if (!(Number.isInteger(p) && p >= 0 && p < n))
        throw new Error(`${what}: predicted label ${p} at pixel ${i} is not a class id in [0, ${n - 1}]`)
      truthArea[t]++
      predictedArea[p]++
      if (p === t) intersection[t]++
    }
  }

  /** The scores over everything added (on every rank of `distributed`, its areas summed). */
  scores(distributed: Distributed = SINGLE_PROCESS): SegmentationScores {
    const n = this.numLabels
    const summed = sumAcrossRanks(
      distributed,
      this.areas.flatMap((a) => Array.from(a)),
    )
    const [intersection, predicted, truth] = [0, 1, 2].map((k) => summed.slice(k * n, (k + 1) * n))
    const perClassIou = intersection.map((x, c) => {
      const union = predicted[c] + truth[c] - x
      return union > 0 ? x / union : NaN
    })
    const perClassAccuracy = intersection.map((x, c) => (truth[c] > 0 ? x / truth[c] : NaN))
    const labelled = truth.reduce((a, b) => a + b, 0)
    const correct = intersection.reduce((a, b) => a + b, 0)
    return {
      meanIou: nanMean(perClassIou),
      meanAccuracy: nanMean(perClassAccuracy),
      overallAccuracy: labelled > 0 ? correct / labelled : NaN,
      perClassIou,
      perClassAccuracy,
    }
  }
}

/** The mean of the values that are not NaN (NaN when all are). */
function nanMean(values: number[]): number {
  const kept = values.filter((v) => !Number.isNaN(v))
  return kept.length > 0 ? kept.reduce((a, b) => a + b, 0) / kept.length : NaN
}
