export { Beit, pretrainedBackbone } from './model'
export type {
  CreateOptions,
  MimInput,
  PretrainInput,
  TrainStepInput,
  PretrainStepInput,
  BeitLossMetrics,
  BeitStepMetrics,
  ForwardInput,
  ForwardResult,
  ImageSize,
} from './model'
export type { Draws } from './check'
export type { UpdateMetrics } from './native'
export { PRESETS, resolveConfig, gridSize } from './config'
export type { BeitConfig, PresetName, ModelSpec, AdamWOptions } from './config'
export { BlockwiseMaskGenerator, RandomMaskGenerator } from './masking'
export type { MaskGenerator, BlockwiseMaskOptions, RandomMaskOptions } from './masking'
export { warmupCosine, warmupPoly, cosineRamp } from './schedule'
export type { WarmupCosineOptions, CosineRampOptions } from './schedule'
export { pretrain } from './pretrain'
export type { PretrainOptions, PretrainProgress } from './pretrain'
export type { ScheduleOptions, Schedule, LoopOptions, LoopProgress, RunResult } from './run'
export { Classifier, argmaxRows } from './classifier'
export type {
  ClassifierConfig,
  ClassifierSpec,
  ClassifierCreateOptions,
  ClassifierLossMetrics,
  ClassifierStepMetrics,
  ClassifierTrainingOptions,
  LabelledInput,
  Pooling,
} from './classifier'
export { finetune, evaluate } from './finetune'
export type { FinetuneOptions, FinetuneProgress, EpochResult, EvaluateOptions } from './finetune'
export {
  initDistributed,
  detectLaunch,
  sumAcrossRanks,
  anyRank,
  checkSameAcrossRanks,
  barrier,
  SINGLE_PROCESS,
} from './distributed'
export type { Distributed, InitDistributedOptions, Launch } from './distributed'
export { Segmenter } from './segmenter'
export type {
  SegmenterConfig,
  SegmenterSpec,
  SegmenterCreateOptions,
  SegmentationInput,
  SegmentationLogits,
  SegmentedPixels,
  SegmenterLossMetrics,
  SegmenterStepMetrics,
  SegmenterTrainingOptions,
} from './segmenter'
export { SegmentationMetrics } from './segmentation/metrics'
export { fashionScenes } from './segmentation/scenes'
export type { FashionScenesOptions } from './segmentation/scenes'
export {
  segmentationFolder,
  vocSegmentation,
  segmentationManifest,
  SegmentationLoader,
  segmenterView,
  drawPairAugment,
  VOC_CLASSES,
} from './segmentation/data'
export type {
  SegmentationDataset,
  PairSource,
  SegmentationFolderOptions,
  SegmentationTransform,
  SegmentationLoaderOptions,
  SegmentationBatch,
  PairAugment,
} from './segmentation/data'
export { predictionSheet, classColour } from './sheet'
export { finetuneSegmentation, evaluateSegmentation } from './segmentation/finetune'
export type {
  SegmentationFinetuneOptions,
  SegmentationProgress,
  SegmentationEpochResult,
  SegmentationEvaluateOptions,
  Normalization,
} from './segmentation/finetune'
export type { SegmentationMetricsOptions, SegmentationScores } from './segmentation/metrics'
export { linearProbe, pixelProbe, probeFeatures } from './probe'
export type { LinearProbeOptions, LinearProbeResult, PixelProbeOptions } from './probe'
export { CHECKPOINT_FILE, MetricsLog, Progress, interruptSignal } from './run'
export {
  loadFashionMnist,
  embeddedSampleDir,
  FASHION_MNIST_CLASSES,
  DEBIAN_FASHION_MNIST_DIR,
} from './data/fashion-mnist'
export { parseIdx, readIdx } from './data/idx'
export type { IdxArray, LabeledImages } from './data/idx'
export { Rng, deriveSeed } from './rng'
export { Dvae, DVAE_PRESETS, resolveDvaeConfig } from './tokenizer'
export type {
  DvaeConfig,
  DvaePresetName,
  DvaeSpec,
  DvaeTrainingOptions,
  DvaeLossMetrics,
  DvaeStepMetrics,
  TokenizerInput,
  TokenizerStepInput,
} from './tokenizer'
export { trainTokenizer, evaluateTokenizer, writeSheet, tokenizerLoader, TOKENIZER_SCHEDULE } from './train-tokenizer'
export type { TrainTokenizerOptions, TokenizerProgress, TokenizerEvaluation, TokenizerData } from './train-tokenizer'
export { reconstructionSheet } from './sheet'
export { imagesAsFloats } from './data/batches'
export { ImageLoader } from './data/loader'
export type { LoaderOptions, ShardOptions, Batch, LoadedBatch, LoaderStats, SkippedImage } from './data/loader'
export { beitViews, drawAugment, viewSpec } from './data/augment'
export type {
  ViewSpec,
  ViewSpecOptions,
  Interpolation,
  BeitViewOptions,
  Transform,
  TrainTransform,
  EvalTransform,
  ColorJitterOptions,
  Augment,
} from './data/augment'
export {
  imageFolder,
  labelledSubset,
  manifest,
  pixelDataset,
  subset,
  withClassesOf,
  IMAGE_EXTENSIONS,
} from './data/dataset'
export type { ImageDataset, ImageSource, ImageFolderOptions, ManifestOptions } from './data/dataset'
export { openDataset } from './data/open'
export type { Split } from './data/open'
export { checkpointFormat, exportHuggingFace, huggingFaceTask, importHuggingFace } from './huggingface'
export type { HuggingFaceTask, ImportOptions } from './huggingface'
export { bf16GemmSpeedup, cudaDeviceCount, resolveDevice, resolvePrecision } from './device'
export type { DeviceOptions, DeviceSpec, PrecisionSpec } from './device'
