# base: debian
# The Debian image plus an `ubuntu` account holding uid and gid 1000 (as Ubuntu images ship),
# in a second layer, which also removes a file to exercise whiteouts.
base=$("$BUILD" debian | tail -n 1)
mkdir -p "$WORK/layers/1" "$WORK/layers/2"
# Unpack the base image's rootfs as layer 1 so this image has two real layers.
skopeo copy -q "oci:$base:latest" "dir:$WORK/base" 
for blob in $(python3 -c "import json,sys; m=json.load(open('$WORK/base/manifest.json')); print(' '.join(l['digest'].split(':')[1] for l in m['layers']))"); do
  tar --numeric-owner --xattrs --xattrs-include='*' -xzf "$WORK/base/$blob" -C "$WORK/layers/1"
done
rm -rf "$WORK/base"
cp -a "$WORK/layers/1" "$WORK/tmp-root"
chroot "$WORK/tmp-root" groupadd -g 1000 ubuntu
chroot "$WORK/tmp-root" useradd -m -u 1000 -g 1000 -G sudo -s /bin/bash ubuntu
mkdir -p "$WORK/layers/2/etc" "$WORK/layers/2/home"
cp -a "$WORK/tmp-root/etc/passwd" "$WORK/tmp-root/etc/group" "$WORK/tmp-root/etc/shadow" \
      "$WORK/tmp-root/etc/gshadow" "$WORK/layers/2/etc/"
cp -a "$WORK/tmp-root/home/ubuntu" "$WORK/layers/2/home/"
rm -rf "$WORK/tmp-root"
# A whiteout: the second layer deletes /etc/motd.
touch "$WORK/layers/2/etc/.wh.motd"
python3 -c "import json; c=json.load(open('$base/blobs/sha256/'+json.load(open('$base/blobs/sha256/'+json.load(open('$base/index.json'))['manifests'][0]['digest'].split(':')[1]))['config']['digest'].split(':')[1])); json.dump(c['config'], open('$WORK/config.json','w'))"
