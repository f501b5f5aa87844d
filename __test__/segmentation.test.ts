import test from 'ava'

import { SegmentationMetrics } from '../src'

test('IoU, accuracy and overall accuracy as mmseg and evaluate mean_iou count them', (t) => {
  const metrics = new SegmentationMetrics({ numLabels: 4 })
  // The last pixel's truth is ignored (255), so its prediction (2) counts nowhere; class 3 is in
  // neither prediction nor truth.
  metrics.add(Uint8Array.of(0, 1, 1, 1, 0, 2), Uint8Array.of(0, 0, 1, 1, 2, 255))
  const s = metrics.scores()
  // intersection 1, 2, 0; predicted 2, 3, 0; truth 2, 2, 1; union 3, 3, 1
  t.deepEqual(s.perClassIou, [1 / 3, 2 / 3, 0, NaN])
  t.deepEqual(s.perClassAccuracy, [1 / 2, 1, 0, NaN])
  t.is(s.meanIou, (1 / 3 + 2 / 3 + 0) / 3)
  t.is(s.meanAccuracy, 0.5)
  t.is(s.overallAccuracy, 3 / 5)
})

test('areas are summed over the evaluation set, not averaged per image', (t) => {
  const whole = new SegmentationMetrics({ numLabels: 2, ignoreIndex: 9 })
  const split = new SegmentationMetrics({ numLabels: 2, ignoreIndex: 9 })
  const predicted = [Int32Array.of(0, 0, 0, 1), Int32Array.of(1, 1)]
  const truth = [Int32Array.of(0, 0, 1, 1), Int32Array.of(1, 9)]
  whole.add(Int32Array.of(...predicted[0], ...predicted[1]), Int32Array.of(...truth[0], ...truth[1]))
  for (let i = 0; i < 2; i++) split.add(predicted[i], truth[i])
  t.deepEqual(split.scores(), whole.scores())
  // Class 1 over both images (the ignored pixel's prediction left out): intersection 2,
  // predicted 2, truth 3, union 3.
  t.is(split.scores().perClassIou[1], 2 / 3)
  // Per image it would be 1/2 and 1 (mean 0.75): the set's IoU is not that.
  t.not(split.scores().perClassIou[1], 0.75)
})

test('labels that are not class ids are errors naming the image, the pixel and the id', (t) => {
  const metrics = new SegmentationMetrics({ numLabels: 3 })
  t.throws(() => metrics.add([0, 1], [0, 7], 'ADE_val_1.png'), {
    message: 'ADE_val_1.png: true label 7 at pixel 1 is not a class id in [0, 2] nor the ignore index 255',
  })
  t.throws(() => metrics.add([0, 3], [0, 1]), {
    message: 'the image: predicted label 3 at pixel 1 is not a class id in [0, 2]',
  })
  t.throws(() => metrics.add([0], [0, 1]), { message: 'the image: 1 predicted pixels for 2 labelled ones' })
  t.throws(() => new SegmentationMetrics({ numLabels: 0 }), { message: 'numLabels must be a positive integer, got 0' })
  // Nothing labelled yet: no score rather than a made-up one.
  t.true(Number.isNaN(new SegmentationMetrics({ numLabels: 2 }).scores().meanIou))
})
