#!/bin/bash
# kill a random child of run every 20s
end=$(( $(date +%s) + $1 ))
while [ $(date +%s) -lt $end ]; do
  sleep 20
  kids=$(pgrep -P $(cat /tmp/w/s1/run.pid))
  k=$(echo "$kids" | shuf -n1)
  [ -n "$k" ] && kill -9 $k && echo "$(date +%T) killed $k" >> /tmp/w/s1/killer.log
done
