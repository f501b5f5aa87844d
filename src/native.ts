/**
 * The native addon. The CPU build comes from the napi-generated loader (index.js at the package
 * root: a local .node file or the platform package). Where the CUDA variant package
 * (beit-linux-x64-gnu-cuda) is installed and an NVIDIA driver is present it is preferred;
 * when it cannot be used, one line says why and the CPU build is used. BEIT_DEVICE=cpu skips it.
 */
import { existsSync } from 'node:fs'
import type * as Native from '../index'

const CUDA_PACKAGE = 'beit-linux-x64-gnu-cuda'
const NVIDIA_DRIVER = '/proc/driver/nvidia/version'

function loadCuda(): typeof Native | undefined {
  if (process.env.BEIT_DEVICE === 'cpu' || process.platform !== 'linux' || process.arch !== 'x64') return undefined
  let path: string
  try {
    path = require.resolve(CUDA_PACKAGE)
  } catch {
    return undefined // not installed: the CPU build, silently
  }
  if (!existsSync(NVIDIA_DRIVER)) {
    console.warn(
      `beit: ${CUDA_PACKAGE} is installed but no NVIDIA driver was found (${NVIDIA_DRIVER}); using the CPU build`,
    )
    return undefined
  }
  try {
    return require(path) as typeof Native
  } catch (e) {
    console.warn(
      `beit: ${CUDA_PACKAGE} failed to load (${String((e as Error).message).split('\n')[0]}); using the CPU build`,
    )
    return undefined
  }
}

export const native: typeof Native = loadCuda() ?? require('../index.js')
export type {
  NativeClassifier,
  NativeImageLoader,
  NativeLinearProbe,
  NativeBeit,
  NativeDvae,
  NativeSegmenter,
  AdamWOptions,
  BeitLossMetrics,
  BeitStepMetrics,
  ClassifierLossMetrics,
  ClassifierStepMetrics,
  ClassifierTrainingOptions,
  DvaeLossMetrics,
  DvaeStepMetrics,
  DvaeTrainingOptions,
  Launch,
  PretrainInput,
  SegmentationLogits,
  SegmentedPixels,
  SegmenterLossMetrics,
  SegmenterStepMetrics,
  SegmenterTrainingOptions,
  StepDraws,
  UpdateMetrics,
} from '../index'
