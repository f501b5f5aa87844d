/** Training curves as a self-contained SVG: one panel per metric, step on the x axis. */

export interface Series {
  title: string
  /** [x, y] points; non-finite y values are skipped. */
  points: [number, number][]
  /** Log-scale y axis (for the learning rate). */
  log?: boolean
}

const PANEL_W = 360
const PANEL_H = 200
const PAD = { left: 58, right: 12, top: 26, bottom: 30 }
const COLUMNS = 2
/** Points drawn per panel at most: a long run's curve is thinned to each bucket's extremes. */
export const MAX_POINTS = 2000

/** Whether lo and hi are equal up to rounding (ticks between them would not advance). */
function flat(lo: number, hi: number): boolean {
  return hi - lo <= 1e-12 * Math.max(Math.abs(lo), Math.abs(hi))
}

function niceTicks(lo: number, hi: number, count = 4): number[] {
  if (flat(lo, hi)) return [lo]
  const step = Math.pow(10, Math.floor(Math.log10((hi - lo) / count)))
  const err = (hi - lo) / count / step
  const mult = err >= 7.5 ? 10 : err >= 3.5 ? 5 : err >= 1.5 ? 2 : 1
  const s = mult * step
  const ticks: number[] = []
  for (let t = Math.ceil(lo / s) * s; t <= hi + s * 1e-9; t += s) ticks.push(Number(t.toPrecision(12)))
  return ticks
}

/** Smallest and largest value, by a loop: spreading 10^5 values into Math.min overflows the stack. */
function extent(values: number[]): [number, number] {
  let [lo, hi] = [Infinity, -Infinity]
  for (const v of values) [lo, hi] = [Math.min(lo, v), Math.max(hi, v)]
  return [lo, hi]
}

/** At most `MAX_POINTS` points: each run of consecutive points keeps its lowest and highest. */
export function thin(pts: [number, number][]): [number, number][] {
  if (pts.length <= MAX_POINTS) return pts
  const size = Math.ceil(pts.length / (MAX_POINTS / 2))
  const kept: [number, number][] = []
  for (let start = 0; start < pts.length; start += size) {
    const bucket = pts.slice(start, start + size)
    let [low, high] = [0, 0]
    bucket.forEach(([, y], i) => {
      if (y < bucket[low][1]) low = i
      if (y > bucket[high][1]) high = i
    })
    for (const i of low === high ? [low] : [Math.min(low, high), Math.max(low, high)]) kept.push(bucket[i])
  }
  return kept
}

function label(v: number): string {
  if (v === 0) return '0'
  const a = Math.abs(v)
  return a >= 1e4 || a < 1e-2 ? v.toExponential(1) : Number(v.toPrecision(3)).toString()
}

function escape(s: string): string {
  return s.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;')
}

function panel(series: Series, x0: number, y0: number): string {
  const pts = thin(series.points.filter(([x, y]) => Number.isFinite(x) && Number.isFinite(y) && (!series.log || y > 0)))
  const parts = [
    `<text x="${x0 + PAD.left}" y="${y0 + 16}" font-size="13" font-weight="bold">${escape(series.title)}</text>`,
  ]
  const plotW = PANEL_W - PAD.left - PAD.right
  const plotH = PANEL_H - PAD.top - PAD.bottom
  parts.push(
    `<rect x="${x0 + PAD.left}" y="${y0 + PAD.top}" width="${plotW}" height="${plotH}" fill="none" stroke="#999"/>`,
  )
  if (pts.length === 0) return parts.join('')
  const f = (y: number) => (series.log ? Math.log10(y) : y)
  const xs = pts.map((p) => p[0])
  const ys = pts.map((p) => f(p[1]))
  let [xMin, xMax] = extent(xs)
  let [yMin, yMax] = extent(ys)
  if (flat(xMin, xMax)) xMax = xMin + 1
  if (flat(yMin, yMax)) [yMin, yMax] = [yMin - 0.5, yMax + 0.5]
  const sx = (x: number) => x0 + PAD.left + ((x - xMin) / (xMax - xMin)) * plotW
  const sy = (y: number) => y0 + PAD.top + plotH - ((y - yMin) / (yMax - yMin)) * plotH
  for (const t of niceTicks(yMin, yMax)) {
    parts.push(`<line x1="${x0 + PAD.left}" x2="${x0 + PAD.left + plotW}" y1="${sy(t)}" y2="${sy(t)}" stroke="#eee"/>`)
    parts.push(
      `<text x="${x0 + PAD.left - 4}" y="${sy(t) + 4}" font-size="10" text-anchor="end">${label(series.log ? Math.pow(10, t) : t)}</text>`,
    )
  }
  for (const t of niceTicks(xMin, xMax)) {
    parts.push(`<text x="${sx(t)}" y="${y0 + PANEL_H - 12}" font-size="10" text-anchor="middle">${label(t)}</text>`)
  }
  const d = pts.map(([x, y], i) => `${i ? 'L' : 'M'}${sx(x).toFixed(1)},${sy(f(y)).toFixed(1)}`).join('')
  parts.push(`<path d="${d}" fill="none" stroke="#1f6fb4" stroke-width="1.5"/>`)
  if (pts.length < 40)
    for (const [x, y] of pts) parts.push(`<circle cx="${sx(x)}" cy="${sy(f(y))}" r="2.5" fill="#1f6fb4"/>`)
  return parts.join('')
}

export function curvesSvg(title: string, series: Series[]): string {
  const rows = Math.ceil(series.length / COLUMNS)
  const width = PANEL_W * Math.min(COLUMNS, series.length)
  const height = PANEL_H * rows + 30
  const panels = series.map((s, i) => panel(s, (i % COLUMNS) * PANEL_W, 30 + Math.floor(i / COLUMNS) * PANEL_H))
  return (
    `<svg xmlns="http://www.w3.org/2000/svg" width="${width}" height="${height}" font-family="sans-serif">` +
    `<rect width="100%" height="100%" fill="white"/>` +
    `<text x="10" y="20" font-size="15">${escape(title)}</text>${panels.join('')}</svg>\n`
  )
}
