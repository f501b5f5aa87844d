/**
 * Reader for the IDX format used by (Fashion-)MNIST:
 *   bytes 0-1  zero
 *   byte  2    element type code
 *   byte  3    number of dimensions
 *   then one big-endian uint32 per dimension, then the elements, big-endian, row-major.
 * Files may be gzip-compressed, as they are distributed.
 */
import { readFile } from 'node:fs/promises'
import { gunzipSync } from 'node:zlib'

export type IdxDtype = 'uint8' | 'int8' | 'int16' | 'int32' | 'float32' | 'float64'

export interface IdxArray {
  dtype: IdxDtype
  shape: number[]
  data: Uint8Array | Int8Array | Int16Array | Int32Array | Float32Array | Float64Array
}

/** A labelled grayscale image set, as loaded from a pair of IDX files. */
export interface LabeledImages {
  /** N*H*W pixels, row-major, 0..255. */
  images: Uint8Array
  labels: Uint8Array
  count: number
  height: number
  width: number
  channels: 1
  classNames: string[]
}

interface DtypeSpec {
  dtype: IdxDtype
  bytes: number
  /** Decodes `count` big-endian elements starting at `view`'s offset 0. */
  decode(view: DataView, count: number): IdxArray['data']
}

function decodeWith<T extends Int16Array | Int32Array | Float32Array | Float64Array>(
  make: (count: number) => T,
  bytes: number,
  get: (view: DataView, offset: number) => number,
): (view: DataView, count: number) => T {
  return (view, count) => {
    const out = make(count)
    for (let i = 0; i < count; i++) out[i] = get(view, i * bytes)
    return out
  }
}

// Single-byte types are copied rather than viewed so the result never aliases the caller's buffer.
const DTYPES: ReadonlyMap<number, DtypeSpec> = new Map([
  [
    0x08,
    { dtype: 'uint8', bytes: 1, decode: (v, n) => new Uint8Array(v.buffer.slice(v.byteOffset, v.byteOffset + n)) },
  ],
  [0x09, { dtype: 'int8', bytes: 1, decode: (v, n) => new Int8Array(v.buffer.slice(v.byteOffset, v.byteOffset + n)) }],
  [
    0x0b,
    {
      dtype: 'int16',
      bytes: 2,
      decode: decodeWith(
        (n) => new Int16Array(n),
        2,
        (v, o) => v.getInt16(o, false),
      ),
    },
  ],
  [
    0x0c,
    {
      dtype: 'int32',
      bytes: 4,
      decode: decodeWith(
        (n) => new Int32Array(n),
        4,
        (v, o) => v.getInt32(o, false),
      ),
    },
  ],
  [
    0x0d,
    {
      dtype: 'float32',
      bytes: 4,
      decode: decodeWith(
        (n) => new Float32Array(n),
        4,
        (v, o) => v.getFloat32(o, false),
      ),
    },
  ],
  [
    0x0e,
    {
      dtype: 'float64',
      bytes: 8,
      decode: decodeWith(
        (n) => new Float64Array(n),
        8,
        (v, o) => v.getFloat64(o, false),
      ),
    },
  ],
] satisfies [number, DtypeSpec][])

const hex = (b: number): string => b.toString(16).padStart(2, '0')

function isGzip(bytes: Uint8Array): boolean {
  return bytes.length >= 2 && bytes[0] === 0x1f && bytes[1] === 0x8b
}

/**
 * Parses an IDX array from raw or gzip-compressed bytes.
 * `source` (a file name, say) is only used to make error messages point somewhere.
 */
export function parseIdx(bytes: Uint8Array, source = '<bytes>'): IdxArray {
  function fail(what: string): never {
    throw new Error(`${source}: invalid IDX data: ${what}`)
  }

  let raw = bytes
  if (isGzip(bytes)) {
    try {
      raw = gunzipSync(bytes)
    } catch (err) {
      fail(`gzip decompression failed (${(err as Error).message})`)
    }
  }

  if (raw.length < 4) fail(`header truncated: expected at least 4 bytes, got ${raw.length}`)
  if (raw[0] !== 0 || raw[1] !== 0) {
    fail(`bad magic: expected first two bytes 00 00, got ${hex(raw[0])} ${hex(raw[1])}`)
  }
  const code = raw[2]
  const spec = DTYPES.get(code) ?? fail(`unknown dtype code 0x${hex(code)} (expected one of 08, 09, 0b, 0c, 0d, 0e)`)
  const ndim = raw[3]
  if (ndim === 0) fail('zero dimensions: expected ndim >= 1')

  const headerBytes = 4 + 4 * ndim
  if (raw.length < headerBytes) {
    fail(`header truncated: ${ndim} dimensions need ${headerBytes} header bytes, got ${raw.length}`)
  }
  const view = new DataView(raw.buffer, raw.byteOffset, raw.byteLength)
  const shape: number[] = []
  for (let d = 0; d < ndim; d++) {
    const size = view.getUint32(4 + 4 * d, false)
    if (size === 0) fail(`dimension ${d} has size 0`)
    shape.push(size)
  }

  const count = shape.reduce((a, b) => a * b, 1)
  const expected = count * spec.bytes
  const actual = raw.length - headerBytes
  const describe = `shape [${shape.join(', ')}] of ${spec.dtype} needs ${expected} data bytes`
  if (actual < expected) fail(`truncated data: ${describe}, got ${actual}`)
  if (actual > expected) fail(`${actual - expected} trailing bytes: ${describe}, got ${actual}`)

  const body = new DataView(raw.buffer, raw.byteOffset + headerBytes, expected)
  return { dtype: spec.dtype, shape, data: spec.decode(body, count) }
}

/** Reads and parses an IDX file (raw or gzip-compressed). */
export async function readIdx(path: string): Promise<IdxArray> {
  let bytes: Uint8Array
  try {
    bytes = await readFile(path)
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code
    if (code === 'ENOENT') throw new Error(`IDX file not found: ${path}`, { cause: err })
    throw new Error(`cannot read IDX file ${path}: ${(err as Error).message}`, { cause: err })
  }
  return parseIdx(bytes, path)
}
