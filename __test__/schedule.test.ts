import test from 'ava'

import { warmupCosine } from '../src/schedule'

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

test('schedule options are validated', (t) => {
  t.throws(() => warmupCosine({ lr: 0, warmupSteps: 0, totalSteps: 10 }), { message: /lr must be > 0/ })
  t.throws(() => warmupCosine({ lr: 1, warmupSteps: 11, totalSteps: 10 }), { message: /warmupSteps must be an integer in \[0, totalSteps=10\], got 11/ })
  t.throws(() => warmupCosine({ lr: 1, minLr: 2, warmupSteps: 0, totalSteps: 10 }), { message: /minLr must be in \[0, lr\]/ })
})
