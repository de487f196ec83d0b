"""The stylesheet and script `mars show` inlines into every page (no CDN, no server).

Kept as Python strings, not package data files, so an installed wheel always has them.
The script never builds HTML from record data: it only reads data-* attributes and sets
`hidden` and textContent, so nothing in a record can run as code in the page.
"""

CSS = """
:root { --ok: #1a7f37; --bad: #cf222e; --na: #8c959f; --box: #ff2d55; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0; background: #f6f8fa; color: #1f2328; }
header.bar { position: sticky; top: 0; z-index: 5; background: #24292f; color: #fff; padding: 8px 16px;
  display: flex; gap: 12px; align-items: center; flex-wrap: wrap; }
header.bar h1 { font-size: 16px; margin: 0 12px 0 0; }
header.bar select, header.bar input { font: inherit; padding: 2px 6px; }
#count { margin-left: auto; opacity: .85; }
main { padding: 12px 16px; }
article.ep { background: #fff; border: 1px solid #d0d7de; border-left: 6px solid var(--na); border-radius: 6px;
  margin: 0 0 16px; padding: 10px 14px; content-visibility: auto; contain-intrinsic-size: 900px; }
article.ep[data-outcome=correct] { border-left-color: var(--ok); }
article.ep[data-outcome=wrong] { border-left-color: var(--bad); }
.ep h2 { font-size: 15px; margin: 0 0 6px; font-weight: 600; }
.tag { display: inline-block; font-size: 12px; padding: 0 6px; border-radius: 10px; background: #eaeef2; margin-right: 4px; }
.tag.correct { background: #dafbe1; color: var(--ok); } .tag.wrong { background: #ffebe9; color: var(--bad); }
.question { white-space: pre-wrap; font-size: 15px; margin: 6px 0 10px; }
.figs { display: flex; gap: 10px; flex-wrap: wrap; }
figure.src { position: relative; margin: 0; max-width: min(760px, 100%); flex: 0 1 auto; line-height: 0; }
/* A portrait photo is bounded by the window's height, not only its width. */
figure.src img { display: block; max-width: 100%; max-height: 70vh; width: auto; height: auto; border: 1px solid #d0d7de; }
.box { position: absolute; border: 2px solid var(--box); box-shadow: 0 0 0 1px #fff; pointer-events: none; }
.box span { position: absolute; top: -18px; left: -2px; background: var(--box); color: #fff; font: 11px/16px sans-serif;
  padding: 0 4px; white-space: nowrap; }
.turn { border-top: 1px dashed #d0d7de; padding: 6px 0; }
.turn .who { font-weight: 600; font-size: 12px; color: #57606a; text-transform: uppercase; }
.thinking { color: #57606a; font-style: italic; white-space: pre-wrap; }
pre { white-space: pre-wrap; word-break: break-word; background: #f6f8fa; border-radius: 4px; padding: 6px 8px; margin: 4px 0;
  font: 12px/1.4 ui-monospace, SFMono-Regular, Menlo, monospace; max-height: 320px; overflow: auto; }
.call pre { background: #ddf4ff; } .err pre { background: #ffebe9; }
.answer { font-weight: 600; }
img.inline { max-height: 220px; max-width: 100%; border: 1px solid #d0d7de; margin: 2px 6px 2px 0; vertical-align: top; }
.missing-img { display: inline-block; padding: 20px; background: #eaeef2; color: #57606a; font-size: 12px; }
.thumbs { display: grid; grid-template-columns: repeat(auto-fill, minmax(150px, 1fr)); gap: 8px; margin: 4px 0; }
figure.thumb { margin: 0; background: #f6f8fa; border: 1px solid #d0d7de; border-radius: 4px; padding: 4px; }
figure.thumb img { display: block; width: 100%; height: 140px; object-fit: contain; }
figure.thumb figcaption { font: 11px/1.35 ui-monospace, SFMono-Regular, Menlo, monospace; white-space: pre-wrap;
  word-break: break-word; max-height: 7em; overflow: auto; margin-top: 4px; }
section.summary { padding: 10px 16px 0; }
section.summary table { border-collapse: collapse; background: #fff; border: 1px solid #d0d7de; }
section.summary th, section.summary td { padding: 4px 10px; border-bottom: 1px solid #eaeef2; text-align: left; font-size: 13px; }
section.summary td.acc { font-weight: 600; }
.fin-error { color: var(--bad); font-weight: 600; }
body.sbs section.group.multi { display: grid; grid-auto-flow: column; grid-auto-columns: minmax(460px, 1fr); gap: 12px;
  overflow-x: auto; align-items: start; margin-bottom: 16px; }
body.sbs section.group.multi article.ep { margin: 0; }
dl.result { display: grid; grid-template-columns: max-content 1fr; gap: 2px 12px; margin: 8px 0 0; }
dl.result dt { color: #57606a; } dl.result dd { margin: 0; }
"""

JS = """
(function () {
  var eps = Array.prototype.slice.call(document.querySelectorAll('article.ep'));
  var bench = document.getElementById('f-bench'), outcome = document.getElementById('f-outcome'),
      text = document.getElementById('f-text'), count = document.getElementById('count'),
      sbs = document.getElementById('f-sbs');
  function readHash() {
    var h = new URLSearchParams(location.hash.replace(/^#/, ''));
    if (h.has('benchmark')) bench.value = h.get('benchmark');
    if (h.has('outcome')) outcome.value = h.get('outcome');
    if (h.has('q')) text.value = h.get('q');
    if (sbs) sbs.checked = h.get('sbs') === '1';
  }
  function apply(writeHash) {
    var b = bench.value, o = outcome.value, q = text.value.trim().toLowerCase(), shown = 0;
    eps.forEach(function (ep) {
      var ok = (!b || ep.dataset.benchmark === b) && (!o || ep.dataset.outcome === o ||
               (o === 'rewarded' && parseFloat(ep.dataset.reward) > 0)) &&
               (!q || ep.dataset.search.indexOf(q) >= 0);
      ep.hidden = !ok;
      if (ok) shown++;
    });
    count.textContent = 'showing ' + shown + ' of ' + eps.length + ' episodes';
    document.body.dataset.shown = String(shown);
    document.body.classList.toggle('sbs', !!(sbs && sbs.checked));
    if (writeHash) {
      var p = new URLSearchParams();
      if (b) p.set('benchmark', b); if (o) p.set('outcome', o); if (q) p.set('q', q);
      if (sbs && sbs.checked) p.set('sbs', '1');
      history.replaceState(null, '', '#' + p.toString());
    }
  }
  readHash();
  [bench, outcome, sbs].forEach(function (el) { if (el) el.addEventListener('change', function () { apply(true); }); });
  text.addEventListener('input', function () { apply(true); });
  window.addEventListener('hashchange', function () { readHash(); apply(false); });
  apply(false);
})();
"""
