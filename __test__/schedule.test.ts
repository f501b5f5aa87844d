import test from 'ava'

import { scheduleFor } from '../src/run'
import { cosineRamp, warmupCosine, warmupPoly } from '../src/schedule'

test('warmup rises linearly to the peak, then cosine decays to minLr at the last step', (t) => {
  const lr = warmupCosine({ lr: 1e-3, minLr: 1e-5, warmupSteps: 10, totalSteps: 110 })
  t.is(lr(0), 1e-4)
  t.is(lr(4), 5e-4)
  t.is(lr(9), 1e-3)
  t.is(lr(10), 1e-3)
  t.true(Math.abs(lr(10 + 49.5) - (1e-5 + 1e-3) / 2) < 1e-6, 'half way down at the middle of the decay')
  t.true(Math.abs(lr(109) - 1e-5) < 1e-12)
  for (let s = 11; s < 110; s++) t.true(lr(s) <= lr(s - 1), `monotone decay at ${s}`)
})

test('a single decay step is at the peak, not at minLr', (t) => {
  t.is(warmupCosine({ lr: 1e-3, minLr: 1e-5, warmupSteps: 0, totalSteps: 1 })(0), 1e-3)
  const lr = warmupCosine({ lr: 1e-3, minLr: 1e-5, warmupSteps: 9, totalSteps: 10 })
  t.is(lr(8), 1e-3)
  t.is(lr(9), 1e-3)
})

test("poly decay follows mmseg's PolyLR after the warmup", (t) => {
  const lr = warmupPoly({ lr: 1e-3, warmupSteps: 4, totalSteps: 24, power: 0.9, minLr: 1e-6 })
  t.is(lr(0), 2.5e-4)
  t.is(lr(3), 1e-3)
  // mmengine's PolyLR, step by step from the warmup's end: lr <- min + (lr - min)(1 - 1/(T - t))^p.
  let expected = 1e-3
  for (let t0 = 0; t0 < 20; t0++) {
    if (t0 > 0) expected = 1e-6 + (expected - 1e-6) * (1 - 1 / (20 - t0 + 1)) ** 0.9
    t.true(Math.abs(lr(4 + t0) - expected) < 1e-15, `decay step ${t0}: ${lr(4 + t0)} vs ${expected}`)
  }
  t.true(lr(23) > 1e-6, 'the last step still moves the weights')
  const byOptions = scheduleFor({ lr: 1e-3, warmupSteps: 4, decay: 'poly' }, 24)
  t.is(byOptions(14), warmupPoly({ lr: 1e-3, warmupSteps: 4, totalSteps: 24 })(14))
  t.is(byOptions(14), 1e-3 * 0.5, 'power 1 and minLr 0 by default: linear to 0')
  t.throws(() => scheduleFor({ lr: 1e-3, decay: 'step' as 'poly' }, 10), {
    message: "schedule.decay must be 'cosine' or 'poly', got step",
  })
  t.throws(() => warmupPoly({ lr: 1, power: 0, warmupSteps: 0, totalSteps: 10 }), {
    message: 'power must be a positive number, got 0',
  })
})

test('schedule options are validated', (t) => {
  t.throws(() => warmupCosine({ lr: 0, warmupSteps: 0, totalSteps: 10 }), { message: /lr must be > 0/ })
  t.throws(() => warmupCosine({ lr: 1, warmupSteps: 11, totalSteps: 10 }), {
    message: /warmupSteps must be an integer in \[0, totalSteps=10\], got 11/,
  })
  t.throws(() => warmupCosine({ lr: 1, minLr: 2, warmupSteps: 0, totalSteps: 10 }), {
    message: /minLr must be in \[0, lr\]/,
  })
})

test('cosineRamp moves from `from` to `to` over `steps` and stays there', (t) => {
  const temp = cosineRamp({ from: 1, to: 1 / 16, steps: 100 })
  t.is(temp(0), 1)
  t.true(Math.abs(temp(50) - (1 + 1 / 16) / 2) < 1e-12)
  t.is(temp(100), 1 / 16)
  t.is(temp(500), 1 / 16)
  for (let s = 1; s <= 100; s++) t.true(temp(s) < temp(s - 1))
  const kl = cosineRamp({ from: 0, to: 6.6, steps: 10 })
  t.is(kl(0), 0)
  t.is(kl(10), 6.6)
  t.throws(() => cosineRamp({ from: 0, to: 1, steps: -1 }), { message: /steps must be an integer >= 0/ })
})
