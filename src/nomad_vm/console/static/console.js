// The console page: noVNC's RFB client (Debian's novnc package, served under /novnc/) on the
// websocket bridge of this VM. #status tells the person (and the browser test) what happened.
import RFB from '/novnc/core/rfb.js';

const body = document.body;
const status = document.getElementById('status');
const url = new URL(body.dataset.ws, window.location.href);
url.protocol = window.location.protocol === 'https:' ? 'wss:' : 'ws:';

function show(state, text) {
    status.dataset.state = state;
    status.textContent = text;
}

show('connecting', 'connecting');
const rfb = new RFB(document.getElementById('screen'), url.href);
rfb.scaleViewport = true;
rfb.addEventListener('connect', () => show('connected', 'connected'));
rfb.addEventListener('disconnect', (e) =>
    show('disconnected', e.detail.clean ? 'disconnected' : 'connection failed'));
rfb.addEventListener('desktopname', (e) => { document.title = e.detail.name; });
document.getElementById('ctrl-alt-del').addEventListener('click', () => rfb.sendCtrlAltDel());
