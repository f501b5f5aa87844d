// The ESM entry point: the same API as the CommonJS build (Node maps its named exports).
export * from './index.js'
