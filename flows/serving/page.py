"""The status page: one static HTML document whose script asks for an administrator key and
renders ``/v1/status`` (champion, traffic, drift, detector rates, alerts). The key stays in
the browser tab (sessionStorage) and travels only in the Authorization header."""

STATUS_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>mlsec serving status</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 body{font-family:system-ui,sans-serif;margin:1.5rem;max-width:70rem;color:#1d2330}
 h1{font-size:1.4rem} h2{font-size:1.05rem;margin:1.2rem 0 .4rem}
 table{border-collapse:collapse;width:100%} td,th{border-bottom:1px solid #dde;padding:.25rem .5rem;text-align:left;font-size:.9rem}
 .bad{color:#b00020;font-weight:600} .ok{color:#0a6b2d;font-weight:600} #login{margin:1rem 0}
 .grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(16rem,1fr));gap:1rem}
 section{border:1px solid #dde;border-radius:.4rem;padding:.4rem .8rem}
</style></head>
<body>
<h1>mlsec serving status</h1>
<form id="login"><label>Administrator key <input id="key" type="password" autocomplete="off" size="50"></label>
<button id="show" type="submit">Show</button> <span id="message"></span></form>
<div id="content" hidden>
<div class="grid">
<section id="champion"><h2>Champion</h2><div class="body"></div></section>
<section id="traffic"><h2>Traffic (last hour)</h2><div class="body"></div></section>
<section id="drift"><h2>Input drift</h2><div class="body"></div></section>
<section id="detectors"><h2>Detectors</h2><div class="body"></div></section>
</div>
<section id="alerts"><h2>Alerts</h2><div class="body"></div></section>
</div>
<script>
const $ = (id) => document.getElementById(id);
function esc(v){return String(v===null||v===undefined?'-':v).replace(/[&<>"']/g,c=>({'&':'&amp;','<':'&lt;','>':'&gt;','"':'&quot;',"'":'&#39;'}[c]));}
function rows(obj){return '<table>'+Object.entries(obj).map(([k,v])=>'<tr><th>'+esc(k)+'</th><td>'+esc(typeof v==='object'&&v!==null?JSON.stringify(v):v)+'</td></tr>').join('')+'</table>';}
function render(s){
  const c=s.champion, d=c.detector||{};
  const ip=c.input_policy;
  $('champion').querySelector('.body').innerHTML=rows({model:c.model, version:c.version, run:c.run_id,
     inputs:ip?'table rows; missing cells: '+ip.missing+'; unseen categories: '+(ip.unknown_category==='refuse'?'refused':'all zeros'):'images',
     weights:String(c.weights_sha256).slice(0,16)+'...', 'switches':s.switches, 'refused versions':Object.keys(s.refused).join(', ')||'none'});
  $('traffic').querySelector('.body').innerHTML=rows(s.traffic);
  const dr=s.drift||{};
  $('drift').querySelector('.body').innerHTML=(dr.drifted?'<p class="bad">DRIFT</p>':'<p class="ok">no drift</p>')+rows(dr);
  $('detectors').querySelector('.body').innerHTML=rows({'window detector rate':s.rates.detector_rate,
     'window low-confidence rate':s.rates.low_confidence_rate, 'held-out false positives':d.false_positive_rate,
     'PGD detection (held-out)':JSON.stringify(d.pgd_detection_rate||{}), 'flagged clients':s.flagged_clients.join(', ')||'none',
     'telemetry': s.telemetry.healthy?'ok':'UNAVAILABLE: '+s.telemetry.error});
  $('alerts').querySelector('.body').innerHTML=s.alerts.length?'<table><tr><th>time</th><th>kind</th><th>severity</th><th>message</th></tr>'+
     s.alerts.map(a=>'<tr class="alert"><td>'+esc(new Date(a.time*1000).toISOString())+'</td><td>'+esc(a.kind)+'</td><td class="'+(a.severity==='critical'?'bad':'')+'">'+esc(a.severity)+'</td><td>'+esc(a.message)+'</td></tr>').join('')+'</table>':'<p>none</p>';
  $('content').hidden=false;
}
async function load(){
  const key=sessionStorage.getItem('mlsec-key'); if(!key) return;
  const r=await fetch('/v1/status',{headers:{'Authorization':'Bearer '+key}});
  if(!r.ok){$('message').textContent='refused ('+r.status+')'; $('content').hidden=true; return;}
  $('message').textContent=''; render(await r.json());
}
$('login').addEventListener('submit',(e)=>{e.preventDefault(); sessionStorage.setItem('mlsec-key',$('key').value); $('key').value=''; load();});
load(); setInterval(load,5000);
</script></body></html>
"""
