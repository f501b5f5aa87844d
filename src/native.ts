/** The napi-generated loader of the native addon (index.js at the package root). */
import type * as Native from '../index'

// eslint-disable-next-line @typescript-eslint/no-require-imports
export const native: typeof Native = require('../index.js')
export type { NativeClassifier, NativeImageLoader, NativeLinearProbe, NativeMimModel, NativeTokenizer } from '../index'
